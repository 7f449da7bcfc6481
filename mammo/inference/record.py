"""The per-image measurements and the JSON record ``<stem>.json`` with its schema.

What lives here: the record's layout (:data:`RECORD_SPEC`, :data:`COMPONENT_SPEC`, :data:`RECORD_SCHEMA_VERSION`)
and its check (:func:`validate_record`); the measurements it holds -- tissue areas in pixels and mm^2
(:func:`tissue_summary`), percent density and its category with their source and caveat (:func:`density_summary`),
lesion components (:func:`lesion_components`), the ROI sentence (:func:`roi_explanation`), the quality verdict
(:mod:`mammo.inference.quality`) and the plain-language findings; what made a record (its ``provenance``:
the input file's identity and :func:`run_settings`); and :func:`build_prediction`, which turns one cascade result
into a :class:`Prediction` (the record plus the arrays the outputs are drawn from).

Nothing here reads or writes files: running the cascade on files is :mod:`mammo.inference.predict`, writing PNG /
JSON / CSV and drawing is :mod:`mammo.inference.outputs`; the probability PNG's encodings are
:mod:`mammo.inference.probability`.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mammo import cascade
from mammo.weights import checkpoints
from mammo import imaging
from mammo.core import labels
from mammo.core import metrics
from mammo.imaging import roi
from mammo.cascade.load import LoadedCascade
from mammo.inference import quality
from mammo.inference.probability import encoding_text



#: Version of the JSON record layout (:data:`RECORD_SPEC`); bump when fields change meaning.
RECORD_SCHEMA_VERSION = 5  # 2: outputs.dicom_seg; 3: outputs.dense_mask, density.dense_category, anatomy,
#                              preprocessing.working_scale; 4: provenance; 5: status ok / warning / rejected and
#                              quality (older records, without them, still validate)

#: Connectivity of lesion components (``cv2.connectedComponentsWithStats``): 8 (diagonal neighbours join).
LESION_CONNECTIVITY = 8

#: At most this many lesion components are listed per image (largest first); ``count`` always gives the total.
MAX_LISTED_COMPONENTS = 100

#: Plain-language names of the density categories (ACR BI-RADS Atlas, 4th edition, 2003).
DENSITY_DESCRIPTIONS = {
    "A": "almost entirely fatty",
    "B": "scattered areas of fibroglandular density",
    "C": "heterogeneously dense",
    "D": "extremely dense",
}
DENSITY_SOURCE = (
    "Percent density = FGT area / breast area x 100, breast = adipose + FGT pixels of the tissue map, pectoral muscle "
    "excluded (area-based density, Byng et al., Phys Med Biol 1994; as in Tiryaki & Kaplanoglu, IRBM 2022). "
    "Categories from the quartiles of the ACR BI-RADS Atlas, 4th edition (2003): A <= 25 %, B 25-50 %, C 50-75 %, "
    "D > 75 % (upper bounds inclusive; metrics.DENSITY_THRESHOLDS_PERCENT)."
)
DENSE_SOURCE = (
    "dense_percent = dense pixels / breast pixels x 100, dense pixels = the pixels of the FGT region above Otsu's "
    "level of that region (imaging.dense_tissue): the FGT class is a region with fat strands inside, as the DDSM "
    "tissue labels draw it; dense-tissue masks of digital mammograms (VinDr-Mammo) mark the dense pixels themselves. "
    "Closer to those masks on digital mammograms (RESULTS.md)."
)
DENSITY_CAVEAT = (
    "An automatic 2-D area estimate from the segmentation, not a radiologist's BI-RADS density assessment "
    "(the BI-RADS 5th edition, 2013, no longer defines categories by percentage)."
)

_NoneType = type(None)
_BOX_SPEC = {"y0": int, "x0": int, "y1": int, "x1": int}
_CHECKPOINT_SPEC = {"path": str, "sha256_16": str, "stage": int, "epoch": (int, _NoneType),
                    "best_metric": (float, int, _NoneType), "metric_name": (str, _NoneType), "input_size": list}
_FLOAT = (float, int)

#: ``record["provenance"]``: what made the record, so that a rerun into the same folder can tell whether the record
#: still answers for its input. ``input``: the input file's size in bytes, modification time (UTC, ISO 8601) and the
#: SHA-256 of its bytes (``mammo.inference.listing.input_identity``); ``settings``: the run's settings that change the
#: outputs (:func:`run_settings`). The weights are the record's ``checkpoints`` (``sha256_16`` of each stage file).
PROVENANCE_SPEC: dict[str, Any] = {
    "input": {"size_bytes": int, "modified_utc": str, "sha256": str},
    "settings": {"lesion_threshold": _FLOAT, "min_lesion_area_px": int, "tta": bool, "adaptive_clahe": str,
                 "anatomy": bool, "prob_encoding": str},
}

#: The documented fields of ``<stem>.json``: name -> type (or tuple of types, or a nested spec). Units: pixels
#: unless the name says ``_mm`` / ``_mm2`` / ``_s``; boxes are half-open ``[y0, y1) x [x0, x1)`` in the input
#: image's own pixel coordinates and orientation.
RECORD_SPEC: dict[str, Any] = {
    "schema_version": int,
    "status": str,  # "ok", "warning" (check before use: quality.reasons) or "rejected" (not a mammogram)
    "quality": (dict, _NoneType),  # mammo.inference.quality.Verdict: status, reasons, measures
    "input": {"path": str, "relative_path": str, "source_format": str, "bit_depth": int, "notes": list},
    "image_size": {"height": int, "width": int},
    "pixel_spacing_mm": (list, _NoneType),  # [row, col] in mm, or null when the file does not state it
    "orientation": {"mirrored_for_processing": bool, "note": str},
    "roi": {"box": _BOX_SPEC, "source": str, "margin_fraction": _FLOAT, "min_side_px": int, "explanation": str},
    "tissue": {"class_names": list, "areas_px": dict, "areas_mm2": (dict, _NoneType), "confidence": _FLOAT},
    "density": {"percent": _FLOAT, "category": str, "category_description": str, "thresholds_percent": list,
                "definition_and_source": str, "caveat": str, "dense_percent": (float, int, _NoneType),
                "dense_definition": str, "dense_category": (str, _NoneType)},
    "lesions": {"threshold": _FLOAT, "connectivity": int, "min_area_px": int, "count": int, "listed": int,
                "max_probability": _FLOAT, "total_area_px": int, "total_area_mm2": (float, int, _NoneType),
                "components": list},
    "preprocessing": {"config": dict, "adaptive_clahe": str, "adaptive_clahe_used": bool, "tta": bool,
                      "working_scale": _FLOAT},
    # the anatomy rules (mammo.cascade.anatomy): the view read and where from, what the rules overruled; null when off
    "anatomy": (dict, _NoneType),
    # file names relative to the JSON's folder; null when not written (predict_image writes nothing)
    "outputs": {"tissue_seg": (str, _NoneType), "tissue_seg_color": (str, _NoneType), "fgt_mask": (str, _NoneType),
                "dense_mask": (str, _NoneType),
                "cancer_prob": (str, _NoneType), "visualization": (str, _NoneType), "dicom_seg": (str, _NoneType),
                "json": (str, _NoneType)},
    "cancer_prob_encoding": str,
    "timings_s": dict,
    "checkpoints": {"stage1": _CHECKPOINT_SPEC, "stage2": _CHECKPOINT_SPEC},
    "runtime": {"device": str, "backend": str, "batch_size": int, "created_utc": str, "versions": dict},
    "findings": list,  # plain-language sentences
    # what made the record (PROVENANCE_SPEC); records of schema versions 1-3 have none and still validate
    "provenance": PROVENANCE_SPEC,
}

#: Fields of each entry of ``record["lesions"]["components"]`` (largest component first).
COMPONENT_SPEC: dict[str, Any] = {
    "id": int, "box": _BOX_SPEC, "area_px": int, "area_mm2": (float, int, _NoneType),
    "max_probability": _FLOAT, "mean_probability": _FLOAT, "centroid_yx": list,
}



# ------------------------------------------------------------------------------------------------- measurements
def _box_dict(y0: int, x0: int, y1: int, x1: int) -> dict:
    return {"y0": int(y0), "x0": int(x0), "y1": int(y1), "x1": int(x1)}


def _pixel_area_mm2(spacing_mm) -> float | None:
    return None if spacing_mm is None else float(spacing_mm[0]) * float(spacing_mm[1])


def tissue_summary(tissue_classes: np.ndarray, spacing_mm=None) -> dict:
    """Per-class areas of a ``(H, W)`` class map: ``{"areas_px": {name: int}, "areas_mm2": {name: float} | None}``."""
    counts = imaging.histogram_u8(tissue_classes)
    areas = {name: int(counts[i]) for i, name in enumerate(labels.TISSUE_CLASS_NAMES)}
    pixel_mm2 = _pixel_area_mm2(spacing_mm)
    return {"areas_px": areas,
            "areas_mm2": None if pixel_mm2 is None else {k: round(v * pixel_mm2, 3) for k, v in areas.items()}}


def density_summary(tissue_classes: np.ndarray, dense: np.ndarray | None = None) -> dict:
    """Percent density of a class map, its category and where both come from (see :data:`DENSITY_SOURCE`); with
    ``dense`` (``(H, W)`` bool, ``imaging.dense_tissue``) also ``dense_percent``: dense pixels / (adipose + FGT)
    pixels, in % (None without ``dense``), with its definition."""
    percent = float(metrics.percent_density(tissue_classes, labels.ADIPOSE, labels.FGT))
    category = metrics.density_category(percent)
    summary = {"percent": round(percent, 3), "category": category,
               "category_description": DENSITY_DESCRIPTIONS[category],
               "thresholds_percent": list(metrics.DENSITY_THRESHOLDS_PERCENT), "definition_and_source": DENSITY_SOURCE,
               "caveat": DENSITY_CAVEAT}
    summary["dense_percent"], summary["dense_category"] = None, None
    if dense is not None:
        breast = int(np.count_nonzero((tissue_classes == labels.ADIPOSE) | (tissue_classes == labels.FGT)))
        summary["dense_percent"] = round(100.0 * int(np.count_nonzero(dense)) / breast, 3) if breast else 0.0
        summary["dense_category"] = metrics.density_category(summary["dense_percent"])
    summary["dense_definition"] = DENSE_SOURCE
    return summary


def _search_region(prob: np.ndarray, threshold: float, box: roi.RoiBox | None) -> tuple[np.ndarray, int, int]:
    """``(view, top, left)``: the part of ``prob`` where lesion components can lie and its offset. With a ROI
    ``box`` (outside which ``prob`` is exactly 0) and a threshold above 0 that is the box, else the whole map."""
    if box is not None and threshold > 0:
        return prob[box.slices()], box.y0, box.x0
    return prob, 0, 0


def _kept_components(prob: np.ndarray, threshold: float, min_area_px: int):
    """Connected components (:data:`LESION_CONNECTIVITY`) of ``prob >= threshold``: ``(ids, stats, centroids,
    kept)`` of ``cv2.connectedComponentsWithStats``, ``kept`` the labels of at least ``min_area_px`` pixels (at
    least 1), largest first (ties by label)."""
    mask = (prob >= threshold).astype(np.uint8)
    n, component_ids, stats, centroids = cv2.connectedComponentsWithStats(mask, connectivity=LESION_CONNECTIVITY)
    kept = sorted((i for i in range(1, n) if stats[i, cv2.CC_STAT_AREA] >= max(1, min_area_px)),
                  key=lambda j: (-int(stats[j, cv2.CC_STAT_AREA]), j))
    return component_ids, stats, centroids, kept


def lesion_mask(prob: np.ndarray, threshold: float = 0.5, min_area_px: int = 1,
                box: roi.RoiBox | None = None) -> np.ndarray:
    """The pixels of the lesion components :func:`lesion_components` reports: ``prob >= threshold`` without the
    components (8-connectivity) of fewer than ``min_area_px`` pixels.

    Args:
        prob: ``(H, W)`` float32 lesion probability in [0, 1].
        box: as in :func:`lesion_components` (only the ROI box is searched).

    Returns:
        ``(H, W)`` bool mask.
    """
    view, top, left = _search_region(prob, threshold, box)
    component_ids, _, _, kept = _kept_components(view, threshold, min_area_px)
    mask = np.zeros(prob.shape, dtype=bool)
    mask[top:top + view.shape[0], left:left + view.shape[1]] = np.isin(
        component_ids, np.asarray(kept, dtype=component_ids.dtype))
    return mask


def lesion_components(prob: np.ndarray, threshold: float = 0.5, spacing_mm=None, min_area_px: int = 1,
                      box: roi.RoiBox | None = None) -> dict:
    """Connected components (8-connectivity) of ``prob >= threshold``, largest first.

    Args:
        prob: ``(H, W)`` float32 lesion probability in [0, 1].
        threshold: probability threshold (components are where ``prob >= threshold``).
        spacing_mm: ``(row, col)`` pixel spacing in mm, or None (then areas in mm^2 are None).
        min_area_px: components smaller than this many pixels are dropped.
        box: the ROI box outside which ``prob`` is exactly 0 (the cascade's ``roi_box``); with a threshold above 0
            the components lie inside it, so only the box is searched (the same result, less work on a full-field
            image). None: the whole map.

    Returns:
        The ``"lesions"`` part of the record: ``threshold``, ``connectivity``, ``min_area_px``, ``count`` (all
        components kept), ``listed`` (at most :data:`MAX_LISTED_COMPONENTS`), ``max_probability`` (over the whole
        map), ``total_area_px`` / ``total_area_mm2`` and ``components`` (each as :data:`COMPONENT_SPEC`; boxes are
        half-open ``[y0, y1) x [x0, x1)`` in pixels, centroids ``[y, x]`` in pixels).
    """
    prob, top, left = _search_region(prob, threshold, box)
    component_ids, stats, centroids, kept = _kept_components(prob, threshold, min_area_px)
    pixel_mm2 = _pixel_area_mm2(spacing_mm)
    components = []
    for i in kept[:MAX_LISTED_COMPONENTS]:  # statistics inside each component's own box (fast on large images)
        x, y, w, h, area = (int(v) for v in stats[i])
        values = prob[y:y + h, x:x + w][component_ids[y:y + h, x:x + w] == i]
        components.append({
            "id": 0, "box": _box_dict(top + y, left + x, top + y + h, left + x + w), "area_px": area,
            "area_mm2": None if pixel_mm2 is None else round(area * pixel_mm2, 3),
            "max_probability": round(float(values.max()), 4),
            "mean_probability": round(float(values.mean(dtype=np.float64)), 4),
            "centroid_yx": [round(top + float(centroids[i][1]), 1), round(left + float(centroids[i][0]), 1)],
        })
    for rank, component in enumerate(components, start=1):
        component["id"] = rank
    total_px = int(sum(int(stats[i, cv2.CC_STAT_AREA]) for i in kept))
    return {
        "threshold": float(threshold), "connectivity": LESION_CONNECTIVITY, "min_area_px": int(min_area_px),
        "count": len(kept), "listed": len(components),
        "max_probability": round(float(prob.max()) if prob.size else 0.0, 4),
        "total_area_px": total_px, "total_area_mm2": None if pixel_mm2 is None else round(total_px * pixel_mm2, 3),
        "components": components,
    }


def roi_explanation(source: str, rule: "roi.RoiRule | float") -> str:
    """A plain sentence saying how the ROI box was chosen (``source`` from ``roi.fgt_roi_box``; ``rule`` the
    ``roi.RoiRule``, or only its margin fraction)."""
    if not isinstance(rule, roi.RoiRule):
        rule = roi.RoiRule(margin_fraction=float(rule))
    grow = f"grown by {rule.margin_fraction * 100:g} % of its height and width on each side"
    if rule.breast_margin_fraction > 0 and source == "fgt":
        grow += f" (at least {rule.breast_margin_fraction * 100:g} % of the breast's height and width)"
    grow += f" (each side at least {rule.min_side} px), clipped to the " + (
        "breast's bounding box" if rule.clip_to_breast and source == "fgt" else "image")
    if source == "fgt":
        specks = (f" FGT specks under {rule.min_fgt_fraction * 100:g} % of the breast's area are left out."
                  if rule.min_fgt_fraction > 0 else "")
        return f"Box around the predicted fibroglandular tissue (FGT), {grow}.{specks}"
    if source == "breast":
        return f"No FGT was predicted: the ROI is the box around the whole breast (all tissue classes), {grow}."
    return "No breast tissue was predicted: the ROI is the whole image."


def _findings(record: dict) -> list[str]:
    height, width = record["image_size"]["height"], record["image_size"]["width"]
    density, roi, lesions = record["density"], record["roi"], record["lesions"]
    spacing = record["pixel_spacing_mm"]
    out = [f"Image {width} x {height} px (W x H), {record['input']['bit_depth']}-bit {record['input']['source_format']}"
           + (f", pixel spacing {spacing[0]:g} x {spacing[1]:g} mm." if spacing else ", pixel spacing unknown "
              "(areas in pixels only).")]
    if density.get("dense_percent") is not None:
        out.append(f"Percent density {density['dense_percent']:.1f} % (dense pixels / breast pixels) -> category "
                   f"{density['dense_category']}; the FGT region is {density['percent']:.1f} % of the breast "
                   f"(category {density['category']}); thresholds {density['thresholds_percent']} %.")
    else:
        out.append(f"Percent density {density['percent']:.1f} % -> category {density['category']} "
                   f"({density['category_description']}); thresholds {density['thresholds_percent']} %.")
    box = roi["box"]
    out.append(f"Lesion search region (rows {box['y0']}-{box['y1']}, columns {box['x0']}-{box['x1']}): "
               + roi["explanation"])
    if lesions["count"] == 0:
        out.append(f"No lesion candidate at probability >= {lesions['threshold']:g} "
                   f"(highest probability {lesions['max_probability']:.2f}).")
    else:
        top = lesions["components"][0]
        size = f"{top['area_px']} px" + (f" = {top['area_mm2']:.1f} mm^2" if top["area_mm2"] is not None else "")
        out.append(f"{lesions['count']} lesion candidate(s) at probability >= {lesions['threshold']:g}; largest "
                   f"{size}, max probability {top['max_probability']:.2f}.")
    anatomy = record.get("anatomy") or {}
    out += [f"The anatomy rules overruled stage 1: {note[len('anatomy'):].lstrip(' :')}."
            for note in anatomy.get("notes", [])]
    if record["preprocessing"]["adaptive_clahe"] != "off":
        out.append("Stronger (adaptive) CLAHE " + ("was used: stage 1 was more confident with it."
                                                   if record["preprocessing"]["adaptive_clahe_used"]
                                                   else "was tried or not needed; the standard CLAHE result was kept."))
    return out


# --------------------------------------------------------------------------------------------------- the record
@dataclass
class Prediction:
    """One image's result: the JSON record and the arrays the outputs are made from."""

    record: dict
    image: imaging.MammogramImage
    result: cascade.CascadeResult


def run_settings(loaded: LoadedCascade, *, threshold: float, min_area_px: int, prob_encoding: str) -> dict:
    """The settings of a run that change its outputs (``record["provenance"]["settings"]``, :data:`PROVENANCE_SPEC`):
    the lesion threshold and smallest component (pixels), test-time augmentation, the adaptive CLAHE mode ("off" /
    "on" / "auto"), the anatomy rules on or off (from ``loaded.cascade``) and the probability PNG's encoding. The
    device, backend, batch size and the optional files are not settings: they do not change the values."""
    model = loaded.cascade
    return {"lesion_threshold": float(threshold), "min_lesion_area_px": int(min_area_px), "tta": bool(model.tta),
            "adaptive_clahe": str(model.adaptive_clahe), "anatomy": bool(getattr(model, "anatomy", True)),
            "prob_encoding": str(prob_encoding)}


def build_prediction(loaded: LoadedCascade, path: Path, image: imaging.MammogramImage, result: cascade.CascadeResult,
                     *, read_s: float, cascade_s: float, threshold: float = 0.5, min_area_px: int = 1,
                     relative_path: str | None = None, prob_encoding: str = "uint8", batch_size: int = 1,
                     input_identity: dict | None = None) -> Prediction:
    """The JSON record of one image from its cascade result (see :func:`mammo.inference.predict.run_image` for the
    arguments).

    ``cascade_s`` is the cascade's seconds for this image (its share of the batch when ``batch_size`` > 1).
    ``input_identity`` (the file's size, modification time and SHA-256, ``mammo.inference.listing.input_identity``)
    makes the record's ``provenance`` with :func:`run_settings`; without it the record has no ``provenance``.
    """
    start = time.perf_counter()
    height, width = image.pixels.shape
    spacing = image.pixel_spacing_mm
    model = loaded.cascade
    record = {
        "schema_version": RECORD_SCHEMA_VERSION,
        "status": "ok",
        "input": {"path": str(path.resolve()), "relative_path": relative_path or path.name,
                  "source_format": image.source_format, "bit_depth": int(image.bit_depth), "notes": list(image.notes)},
        "image_size": {"height": int(height), "width": int(width)},
        "pixel_spacing_mm": None if spacing is None else [float(spacing[0]), float(spacing[1])],
        "orientation": {"mirrored_for_processing": bool(result.flipped),
                        "note": "outputs are in the input's own orientation and resolution"
                                + (" (the image was mirrored for the networks and the outputs mirrored back)"
                                   if result.flipped else "")},
        "roi": {"box": result.roi_box.to_dict(), "source": result.roi_source,
                "margin_fraction": float(model.roi_rule.margin_fraction), "min_side_px": int(model.roi_rule.min_side),
                "explanation": roi_explanation(result.roi_source, model.roi_rule)},
        "tissue": {"class_names": list(labels.TISSUE_CLASS_NAMES), **tissue_summary(result.tissue_classes, spacing),
                   "confidence": round(float(result.tissue_confidence), 4)},
        "density": density_summary(result.tissue_classes, result.dense_tissue),
        "lesions": lesion_components(result.lesion_prob, threshold, spacing, min_area_px, box=result.roi_box),
        "preprocessing": {"config": dict(model.preprocess_config), "adaptive_clahe": model.adaptive_clahe,
                          "adaptive_clahe_used": bool(result.adaptive_clahe_used), "tta": bool(model.tta),
                          "working_scale": round(float(result.working_scale), 6)},
        "anatomy": None if result.anatomy is None else dict(result.anatomy),
        "outputs": {key: None for key in RECORD_SPEC["outputs"]},
        "cancer_prob_encoding": encoding_text(prob_encoding),
        "timings_s": {},
        "checkpoints": loaded.identities,
        "runtime": {"device": loaded.device, "backend": loaded.backend, "batch_size": int(batch_size),
                    "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "versions": _versions()},
        "findings": [],
    }
    if loaded.notes:
        record["input"]["notes"] += loaded.notes
    verdict = quality.result_verdict(quality.image_verdict(image.pixels), record["anatomy"])
    record["status"], record["quality"] = verdict.status, verdict.to_dict()
    prefix = {"warning": "Warning", "rejected": "Rejected"}.get(verdict.status, "")
    record["findings"] = _findings(record) + [f"{prefix}: {text}." for text in verdict.reasons]
    timings = {"read": read_s, **result.timings_s, "cascade_total": cascade_s,
               "postprocess": time.perf_counter() - start}
    record["timings_s"] = {k: round(float(v), 4) for k, v in timings.items()}
    if input_identity is not None:
        record["provenance"] = {"input": dict(input_identity), "settings": run_settings(
            loaded, threshold=threshold, min_area_px=min_area_px, prob_encoding=prob_encoding)}
    return Prediction(record, image, result)


#: Library versions written into every record (``checkpoints.library_versions``), looked up once per process.
_VERSIONS: dict | None = None


def _versions() -> dict:
    global _VERSIONS
    if _VERSIONS is None:
        _VERSIONS = checkpoints.library_versions()
    return _VERSIONS


# --------------------------------------------------------------------------------------------------- validation
def _check(value, spec, where: str, problems: list[str]) -> None:
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected an object, found {type(value).__name__}")
            return
        for key, sub in spec.items():
            if key not in value:
                problems.append(f"{where}.{key}: missing")
            else:
                _check(value[key], sub, f"{where}.{key}", problems)
        return
    types = spec if isinstance(spec, tuple) else (spec,)
    if isinstance(value, bool) and bool not in types:
        problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, found bool")
    elif not isinstance(value, types):
        problems.append(f"{where}: expected {'/'.join(t.__name__ for t in types)}, found {type(value).__name__}")


def validate_record(record: dict) -> list[str]:
    """Check a record (e.g. a loaded ``<stem>.json``) against :data:`RECORD_SPEC` and :data:`COMPONENT_SPEC`.

    Also checks the values that must hold: box inside the image, density category matching the percent, lesion
    count equal to the listed components when below the listing limit. A record without ``provenance`` (written
    before schema version 4) is valid; one with it is checked against :data:`PROVENANCE_SPEC`.

    Returns:
        The problems found, as sentences (empty when the record is valid).
    """
    problems: list[str] = []
    if record.get("schema_version") == 1 and isinstance(record.get("outputs"), dict):  # written before dicom_seg
        record = {**record, "outputs": {"dicom_seg": None, **record["outputs"]}}
    if isinstance(record.get("density"), dict) and "dense_percent" not in record["density"]:  # written before it
        record = {**record, "density": {**record["density"], "dense_percent": None, "dense_definition": ""}}
    if record.get("schema_version") in (1, 2):  # written before the dense mask, the anatomy rules, the working scale
        record = {**record, "anatomy": record.get("anatomy"),
                  "outputs": {"dense_mask": None, **(record.get("outputs") or {})},
                  "density": {"dense_category": None, **(record.get("density") or {})},
                  "preprocessing": {"working_scale": 1.0, **(record.get("preprocessing") or {})}}
    if isinstance(record.get("schema_version"), int) and record["schema_version"] < 5:  # before the quality verdict
        record = {"quality": None, **record}
    spec = RECORD_SPEC if "provenance" in record else {k: v for k, v in RECORD_SPEC.items() if k != "provenance"}
    _check(record, spec, "record", problems)  # a record without provenance (before schema 4) is valid
    if problems:
        return problems
    for i, component in enumerate(record["lesions"]["components"]):
        _check(component, COMPONENT_SPEC, f"record.lesions.components[{i}]", problems)
    height, width = record["image_size"]["height"], record["image_size"]["width"]
    box = record["roi"]["box"]
    if not (0 <= box["y0"] < box["y1"] <= height and 0 <= box["x0"] < box["x1"] <= width):
        problems.append(f"record.roi.box {box} is not inside the {height}x{width} image")
    if metrics.density_category(record["density"]["percent"]) != record["density"]["category"]:
        problems.append("record.density.category does not match record.density.percent")
    if record["roi"]["source"] not in ("fgt", "breast", "image"):
        problems.append(f"record.roi.source {record['roi']['source']!r} is not fgt / breast / image")
    lesions = record["lesions"]
    if lesions["listed"] != len(lesions["components"]) or lesions["listed"] > lesions["count"]:
        problems.append("record.lesions.listed disagrees with the components listed / the count")
    if record["pixel_spacing_mm"] is not None and len(record["pixel_spacing_mm"]) != 2:
        problems.append("record.pixel_spacing_mm must be [row, col]")
    return problems
