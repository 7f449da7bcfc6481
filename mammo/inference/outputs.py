"""Writing one image's outputs and a run's tables, and drawing them: PNG maps, the figure, JSON, ``predictions.csv``.

What lives here: the tissue colours (:data:`TISSUE_COLORS_RGB`, :func:`colorize_tissue`), the output file names
(:func:`output_paths`), the four-panel figure (:func:`make_visualization`), :func:`write_outputs` (one image's PNGs,
figure and JSON, the JSON last), :func:`write_json`, and the folder tables: :data:`CSV_COLUMNS` with
:func:`write_csv`, and :func:`free_name` (a timestamped name instead of overwriting ``predictions.csv`` /
``summary.json``). Every file is written atomically (:mod:`mammo.core.fileio`).

The record itself (its fields and measurements) is :mod:`mammo.inference.record`; the DICOM Segmentation is
:mod:`mammo.inference.dicom_seg`; running the cascade on files is :mod:`mammo.inference.predict`.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
import os
import time
from pathlib import Path
from typing import Iterable

import cv2
import numpy as np

from mammo import cascade
from mammo import imaging
from mammo.core import labels
from mammo.core import metrics
from mammo.core.fileio import atomic_write_bytes, json_safe
from mammo.inference.listing import InputItem, verdict, verdict_reason
from mammo.inference.probability import encode_probability, encoding_text
from mammo.inference.record import Prediction, lesion_mask



#: Every file written for one input ``<stem>``, in the order written: (record ``outputs`` key, file name pattern, what
#: it holds). ``cascade_inference.py --help`` and the README list these; a test checks that the README does.
OUTPUT_FILES = (
    ("tissue_seg", "<stem>_tissue_seg.png",
     "tissue classes, 8-bit indexed-colour PNG: pixel value = class index (0 background, 1 adipose, 2 FGT, "
     "3 pectoral muscle), palette = the display colours, so the file is exact and viewable"),
    ("tissue_seg_color", "<stem>_tissue_seg_color.png",
     "only with --color-map: the same map as 8-bit RGB (black, yellow, magenta, blue), for tools that ignore "
     "palettes"),
    ("fgt_mask", "<stem>_fgt_mask.png", "FGT mask, 8-bit grayscale: 255 = FGT, 0 elsewhere"),
    ("dense_mask", "<stem>_dense_mask.png",
     "dense-tissue mask, 8-bit grayscale: 255 = dense pixel (the FGT region's pixels above its Otsu level), 0 "
     "elsewhere; percent density = its pixels / breast pixels (the record's density.dense_percent)"),
    ("cancer_prob", "<stem>_cancer_prob.png",
     "lesion probability, grayscale PNG: uint8 value = round(p x 255) (default) or, with --prob-encoding uint16, "
     "round(p x 65535); exactly 0 outside the ROI box"),
    ("visualization", "<stem>_visualization.png",
     "RGB figure for reading: image, tissue overlay, FGT + ROI box, lesion probability with its contour "
     "(not with --no-visualization)"),
    ("dicom_seg", "<stem>_seg.dcm",
     "DICOM inputs only (not with --no-dicom-seg): a DICOM Segmentation (BINARY) referencing the source image, "
     "segments 1 adipose, 2 FGT, 3 pectoral muscle, 4 lesion (the listed components: probability >= "
     "--threshold, at least --min-lesion-area px), 5 dense tissue, for PACS viewers"),
    ("json", "<stem>.json",
     "the record: sizes, pixel spacing, ROI, tissue areas (px, mm2), percent density, lesion components, reading "
     "notes, checkpoints, timings (record.RECORD_SPEC); written last, so its presence means the image is complete"),
)

#: Files written for a folder (``--image-dir``), beside the per-image files.
FOLDER_FILES = (
    ("predictions.csv", "one row per input (CSV_COLUMNS): status, reason, size, density, ROI, lesion counts"),
    ("summary.json", "counts by status, failures with reasons, the density distribution, timings, the arguments"),
)

#: Display colours (RGB) of the tissue classes 0..3 in the coloured map, the figure and the viewer. Our choice:
#: background black, adipose yellow, FGT magenta, pectoral muscle blue (distinct for the common colour blindnesses).
TISSUE_COLORS_RGB = ((0, 0, 0), (240, 200, 60), (220, 40, 150), (60, 120, 255))

#: Columns of ``predictions.csv`` (one row per input; empty cells where a value does not apply). ``input_sha256``:
#: the SHA-256 of the input file the row's record was made from (its ``provenance``); ``json``: the record, also for a
#: ``conflict`` (the existing record that was left untouched).
CSV_COLUMNS = ("input", "status", "reason", "height", "width", "pixel_spacing_row_mm", "pixel_spacing_col_mm",
               "dense_percent", "dense_category", "percent_density", "density_category", "anatomy_changed_fraction",
               "roi_source", "roi_y0", "roi_x0", "roi_y1", "roi_x1",
               "lesion_count", "lesion_max_probability", "lesion_total_area_px", "lesion_total_area_mm2",
               "tissue_confidence", "adaptive_clahe_used", "seconds", "input_sha256", "json")


# ----------------------------------------------------------------------------------------- drawing and encoding
def colorize_tissue(tissue_classes: np.ndarray, bgr: bool = False) -> np.ndarray:
    """``(H, W)`` uint8 class map -> ``(H, W, 3)`` uint8 RGB (or BGR, OpenCV's order) with :data:`TISSUE_COLORS_RGB`.

    One ``cv2.applyColorMap`` with a 256-entry lookup table (values above 3 are black): ~10x faster than indexing a
    palette array and converting RGB to BGR (measured on a 2944x1920 map for issue 13)."""
    table = np.zeros((256, 1, 3), np.uint8)
    table[: len(TISSUE_COLORS_RGB), 0] = np.array(TISSUE_COLORS_RGB, np.uint8)[:, ::-1]  # BGR, as OpenCV writes
    coloured = cv2.applyColorMap(np.ascontiguousarray(tissue_classes, dtype=np.uint8), table)
    return coloured if bgr else coloured[..., ::-1]


def display_image(pixels: np.ndarray) -> np.ndarray:
    """The input as ``(H, W)`` uint8 for figures (``imaging.scale_to_uint8`` with its bit-depth scaling)."""
    return imaging.scale_to_uint8(pixels, {"intensity_scaling": "bit_depth"})


#: Colours (BGR) of the figure's overlays: ROI box cyan, lesion heat orange, lesion contour red, text white.
_ROI_BGR, _HEAT_BGR, _CONTOUR_BGR, _TEXT_BGR = (255, 255, 0), (0, 153, 255), (0, 0, 255), (255, 255, 255)
_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BAR_PX = 26  # height of the title strip above each panel and of the figure's title bar, pixels


def _blend(base: np.ndarray, mask: np.ndarray, colour_bgr, alpha) -> np.ndarray:
    """``base`` (H, W, 3) uint8 with ``colour_bgr`` laid over the pixels of ``mask`` at opacity ``alpha``. The colour
    is one BGR triple or an (H, W, 3) array (a colour per pixel); ``alpha`` a number or an (H, W) array in [0, 1]."""
    colour = np.asarray(colour_bgr, np.float32)
    colour = colour[mask] if colour.ndim == 3 else colour
    weight = np.asarray(alpha, np.float32)[mask][:, None] if np.ndim(alpha) else float(alpha)
    out = base.copy()
    out[mask] = np.rint(base[mask] * (1.0 - weight) + colour * weight).astype(np.uint8)
    return out


def _titled(panel: np.ndarray, text: str) -> np.ndarray:
    strip = np.zeros((_BAR_PX, panel.shape[1], 3), np.uint8)
    cv2.putText(strip, text, (4, 18), _FONT, 0.45, _TEXT_BGR, 1, cv2.LINE_AA)
    return np.vstack([strip, panel])


def make_visualization(pixels: np.ndarray, result: cascade.CascadeResult, threshold: float, title: str = "",
                       max_rows: int = 800) -> bytes:
    """The four-panel figure as PNG bytes: image | tissue overlay with legend | FGT + ROI box | lesion probability
    with its contour at ``threshold`` (and the ROI box), under a title bar.

    Drawn with OpenCV on uint8 arrays (no matplotlib figure per image: it cost ~0.5 s of CPU per full-field image,
    measured for issue 13). Images taller than ``max_rows`` are shrunk for drawing only (area interpolation for the
    image and the probability, nearest for the classes); the lesion contour is taken at full resolution and scaled.

    Returns:
        PNG bytes of a ``(h + 2 x 26, 4 x w, 3)`` RGB image, ``h, w`` the drawn size of the input.
    """
    height, width = pixels.shape
    scale = min(1.0, max_rows / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    gray = display_image(pixels)
    classes, prob = result.tissue_classes, result.lesion_prob
    if scale < 1.0:
        gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        classes = cv2.resize(classes, size, interpolation=cv2.INTER_NEAREST)
        prob = cv2.resize(prob, size, interpolation=cv2.INTER_AREA)
    base = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    palette_bgr = np.array([colour[::-1] for colour in TISSUE_COLORS_RGB], np.uint8)

    tissue = _blend(base, classes > 0, palette_bgr[np.minimum(classes, len(palette_bgr) - 1)], 0.45)
    counts = imaging.histogram_u8(result.tissue_classes)
    for row, class_id in enumerate(range(1, len(palette_bgr))):
        y = size[1] - 12 - 18 * (len(palette_bgr) - 2 - row)
        cv2.rectangle(tissue, (6, y - 10), (18, y + 2), tuple(int(c) for c in palette_bgr[class_id]), -1)
        share = 100 * counts[class_id] / max(1, counts.sum())
        cv2.putText(tissue, f"{labels.TISSUE_CLASS_NAMES[class_id]}: {share:.0f} % of image", (24, y), _FONT, 0.4,
                    _TEXT_BGR, 1, cv2.LINE_AA)

    box = result.roi_box
    corners = ((int(box.x0 * scale), int(box.y0 * scale)),
               (max(int(box.x0 * scale), int(round(box.x1 * scale)) - 1),
                max(int(box.y0 * scale), int(round(box.y1 * scale)) - 1)))
    fgt = _blend(base, classes == labels.FGT, palette_bgr[labels.FGT], 0.55)
    heat = _blend(base, prob > 0, _HEAT_BGR, np.clip(prob, 0.0, 1.0) * 0.6)
    contours, _ = cv2.findContours((result.lesion_prob >= threshold).astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if contours:
        scaled = [np.rint(c.astype(np.float32) * scale).astype(np.int32) for c in contours]
        cv2.drawContours(heat, scaled, -1, _CONTOUR_BGR, 1, cv2.LINE_AA)
    for panel in (fgt, heat):
        cv2.rectangle(panel, *corners, _ROI_BGR, 1)

    density = metrics.percent_density(result.tissue_classes)
    panels = [_titled(base, "Image"), _titled(tissue, "Tissue classes"),
              _titled(fgt, f"FGT ({density:.1f} % density), ROI: {result.roi_source}"),
              _titled(heat, f"Lesion probability, contour at {threshold:g}")]
    figure = np.hstack(panels)
    bar = np.zeros((_BAR_PX, figure.shape[1], 3), np.uint8)
    cv2.putText(bar, title, (6, 18), _FONT, 0.5, _TEXT_BGR, 1, cv2.LINE_AA)
    ok, encoded = cv2.imencode(".png", np.vstack([bar, figure]))
    if not ok:  # pragma: no cover - OpenCV fails only on unsupported arrays
        raise ValueError("the figure could not be encoded as PNG")
    return encoded.tobytes()


# -------------------------------------------------------------------------------------------- one image's files
def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """The output files of one input (keys as in the record's ``outputs``)."""
    out_dir = Path(out_dir)
    return {key: out_dir / pattern.replace("<stem>", stem) for key, pattern, _ in OUTPUT_FILES}


def write_json(path: str | os.PathLike, value) -> Path:
    """Write ``value`` as indented UTF-8 JSON, atomically (NaN written as null)."""
    text = json.dumps(json_safe(value), indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def write_outputs(prediction: Prediction, out_dir: str | os.PathLike, stem: str, *, threshold: float = 0.5,
                  prob_encoding: str = "uint8", visualization: bool = True, overwrite: bool = False,
                  protected: Iterable[str | os.PathLike] = (), dicom_seg: bool = True,
                  color_map: bool = False) -> dict:
    """Write one image's outputs (:data:`OUTPUT_FILES`: PNG maps, figure, DICOM SEG, then the JSON last) and fill
    ``record["outputs"]``.

    Args:
        prediction: from :func:`mammo.inference.predict.run_image` (or
            :func:`mammo.inference.record.build_prediction`).
        out_dir: folder for this image's outputs (created).
        stem: file name stem of the outputs.
        threshold: contour level of the figure (should equal the record's lesion threshold).
        prob_encoding: see :data:`PROB_ENCODINGS`.
        visualization: also draw ``<stem>_visualization.png``.
        overwrite: replace an existing ``<stem>.json`` (otherwise FileExistsError).
        protected: input files; an output path equal to one of them raises ValueError (inputs are never written).
        dicom_seg: for a DICOM input, also write ``<stem>_seg.dcm`` (:func:`write_dicom_seg_output`).
        color_map: also write ``<stem>_tissue_seg_color.png`` (off by default: the indexed ``<stem>_tissue_seg.png``
            shows the same colours in any viewer, and the RGB copy cost ~0.1 s of CPU per full-field image).

    Returns:
        The record (also updated in place) with ``outputs`` (file names relative to ``out_dir``) and the
        ``write`` / ``total`` timings.

    Raises:
        FileExistsError: ``<stem>.json`` exists and ``overwrite`` is False. ValueError: see ``protected``.
    """
    start = time.perf_counter()
    paths = output_paths(out_dir, stem)
    protected_set = {Path(p).resolve() for p in protected}
    for path in paths.values():
        if path.resolve() in protected_set:
            raise ValueError(f"output {path} would overwrite an input file; choose another --output-dir")
    if paths["json"].exists() and not overwrite:
        raise FileExistsError(f"{paths['json']} exists; pass --overwrite to replace it")
    result, record = prediction.result, prediction.record
    if record.get("status") == "rejected":  # not a mammogram: the record alone (its reasons), no maps to misread
        record["outputs"] = {key: (path.name if key == "json" else None) for key, path in paths.items()}
        record["timings_s"]["write"] = round(time.perf_counter() - start, 4)
        write_json(paths["json"], record)
        return record
    imaging.write_png(paths["tissue_seg"], result.tissue_classes.astype(np.uint8), palette=TISSUE_COLORS_RGB)
    if color_map:
        imaging.write_png(paths["tissue_seg_color"], colorize_tissue(result.tissue_classes, bgr=True))
    imaging.write_png(paths["fgt_mask"], (result.tissue_classes == labels.FGT).astype(np.uint8) * 255)
    dense = np.zeros(result.tissue_classes.shape, bool) if result.dense_tissue is None else result.dense_tissue
    imaging.write_png(paths["dense_mask"], dense.astype(np.uint8) * 255)
    imaging.write_png(paths["cancer_prob"], encode_probability(result.lesion_prob, prob_encoding))
    record["cancer_prob_encoding"] = encoding_text(prob_encoding)
    if visualization:
        title = (f"{record['input']['relative_path']}: density {density_text(record['density'])}, "
                 f"{record['lesions']['count']} lesion candidate(s)")
        atomic_write_bytes(paths["visualization"],
                           make_visualization(prediction.image.pixels, result, threshold, title))
    seg_written = dicom_seg and prediction.image.source_format == "dicom" and write_dicom_seg_output(
        prediction, paths["dicom_seg"], threshold=threshold)
    written = {"tissue_seg_color": color_map, "visualization": visualization, "dicom_seg": seg_written}
    record["outputs"] = {k: (p.name if written.get(k, True) else None) for k, p in paths.items()}
    timings = record["timings_s"]
    timings["write"] = round(time.perf_counter() - start, 4)
    timings["total"] = round(timings.get("read", 0) + timings.get("cascade_total", 0) + timings.get("postprocess", 0)
                             + timings["write"], 4)
    write_json(paths["json"], record)
    return record


def write_dicom_seg_output(prediction: Prediction, path: Path, *, threshold: float) -> bool:
    """Write ``<stem>_seg.dcm`` of a DICOM input (``dicom_seg.write_dicom_seg``): the tissue classes and the lesion
    mask on the source's pixel grid, the algorithm version naming both checkpoints. The lesion mask holds the
    components the record lists (``record.lesion_mask``: ``lesion_prob >= threshold``, components of fewer than the
    record's ``lesions.min_area_px`` pixels left out), so a viewer shows what the JSON reports.

    Like the PNGs, an existing file is replaced: :func:`write_outputs` has already refused to redo an image whose
    JSON exists, so a file here is left from an interrupted run. A source the SEG cannot be made for (a multi-frame
    image, a source highdicom refuses) costs only this file: the reason is added to the record's findings and input
    notes, and False is returned; the other outputs stand.
    """
    from mammo.inference import dicom_seg  # highdicom is imported only when a DICOM input is written

    record, result = prediction.record, prediction.result
    identities = record.get("checkpoints", {})
    version = "stage1 {} stage2 {}".format(*(identities.get(f"stage{n}", {}).get("sha256_16", "?")[:12]
                                             for n in (1, 2)))
    min_area_px = int(record["lesions"]["min_area_px"])
    lesions = lesion_mask(result.lesion_prob, threshold, min_area_px, box=result.roi_box)
    try:
        dicom_seg.write_dicom_seg(prediction.image.path, result.tissue_classes, lesions, path, overwrite=True,
                                  threshold=threshold, min_area_px=min_area_px, algorithm_version=version,
                                  dense_mask=result.dense_tissue)
    except ValueError as error:
        text = f"DICOM Segmentation not written: {error}"
        record["input"]["notes"].append(text)
        record["findings"].append(f"Warning: {text}.")
        return False
    return True


# ------------------------------------------------------------------------------------------------ folder tables
def _blank_if_none(value):
    return "" if value is None else value


def density_text(density: dict) -> str:
    """The density as the console, the figure and the viewer print it: the dense-pixel percent and its category
    first (what dense-tissue masks and density tools measure), the FGT region's percent after it."""
    if density.get("dense_percent") is None:
        return f"{density['percent']:.1f} % ({density['category']})"
    return (f"{density['dense_percent']:.1f} % dense ({density['dense_category']}), FGT region "
            f"{density['percent']:.1f} %")


def _row(item: InputItem) -> dict:
    """One ``predictions.csv`` row (:data:`CSV_COLUMNS`) of an input; record cells stay empty when it has none."""
    row = {column: "" for column in CSV_COLUMNS}
    row.update(input=item.relative, status=verdict(item), reason=verdict_reason(item))
    if item.status == "conflict":
        row["json"] = (Path(item.relative).parent / f"{item.stem}.json").as_posix()
    record = item.record
    if record and verdict(item) == "rejected":  # not a mammogram: its numbers are not reported in the table
        return row
    if record:
        reasons = (record.get("quality") or {}).get("reasons", [])
        if reasons and not item.reason:  # an image done with a warning or rejected says why (mammo.inference.quality)
            row["reason"] = "; ".join(reasons)
        spacing = record.get("pixel_spacing_mm") or ["", ""]
        box = record["roi"]["box"]
        lesions = record["lesions"]
        row.update(height=record["image_size"]["height"], width=record["image_size"]["width"],
                   pixel_spacing_row_mm=spacing[0], pixel_spacing_col_mm=spacing[1],
                   percent_density=record["density"]["percent"], density_category=record["density"]["category"],
                   dense_percent=_blank_if_none(record["density"].get("dense_percent")),
                   dense_category=_blank_if_none(record["density"].get("dense_category")),
                   anatomy_changed_fraction=_blank_if_none((record.get("anatomy") or {}).get("changed_fraction")),
                   roi_source=record["roi"]["source"], roi_y0=box["y0"], roi_x0=box["x0"], roi_y1=box["y1"],
                   roi_x1=box["x1"], lesion_count=lesions["count"], lesion_max_probability=lesions["max_probability"],
                   lesion_total_area_px=lesions["total_area_px"],
                   lesion_total_area_mm2="" if lesions["total_area_mm2"] is None else lesions["total_area_mm2"],
                   tissue_confidence=record["tissue"]["confidence"],
                   adaptive_clahe_used=record["preprocessing"]["adaptive_clahe_used"],
                   seconds="" if item.seconds is None else round(item.seconds, 3),
                   input_sha256=((record.get("provenance") or {}).get("input") or {}).get("sha256", ""),
                   json=(Path(item.relative).parent / f"{item.stem}.json").as_posix())
    return row


def free_name(path: Path, overwrite: bool) -> Path:
    """``path``; when it exists and ``overwrite`` is False, a free ``<stem>_<YYYYmmdd-HHMMSS>[_N]<suffix>`` beside
    it."""
    if overwrite or not path.exists():
        return path
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.stem}_{stamp}{path.suffix}")
    counter = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.stem}_{stamp}_{counter}{path.suffix}")
        counter += 1
    return candidate


def write_csv(path: Path, items: list[InputItem]) -> Path:
    """``predictions.csv``: one row per input, :data:`CSV_COLUMNS`, written atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow(_row(item))
    return atomic_write_bytes(path, buffer.getvalue().encode("utf-8"))
