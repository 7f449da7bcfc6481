"""The scores of the evaluation: per-image rows, data-set summaries, the loops over the cases, the conventions.

What lives here (the cases are ``cases.py``, the predictors ``predictors.py``, the figures ``plots.py``, the command
line ``evaluate.py``):

- tissue: :func:`tissue_row` (one image), :func:`summarize_tissue` (the data set), :func:`evaluate_tissue`;
- lesion: :func:`lesion_row`, :func:`roi_box_fields`, :func:`summarize_lesion`, :func:`summarize_roi_box`,
  :func:`summarize_lesion_by_group`, :func:`evaluate_lesion`;
- density: :func:`otsu_fgt` (the baseline), :func:`density_row`, :func:`summarize_density`, :func:`evaluate_density`;
- CSAW-S: :func:`csaw_row`, :func:`summarize_csaw`, :func:`evaluate_csaw`;
- the conventions written into ``metrics.json`` (:data:`CONVENTIONS`) and the metric constants.

The ``evaluate_*`` loops skip a bad item (appended to ``skipped`` with its reason) and go on.

Metrics (all computed with :mod:`metrics`):
    tissue: per-class Dice and IoU (background, adipose, FGT, pectoral), macro Dice (mean over adipose, FGT,
    pectoral), pixel accuracy, and the 4-channel Dice (mean of the four per-class Dice values including background:
    the figure Tiryaki & Kaplanoglu, IRBM 2022 report for the DDSM tissue-label set); each per image and averaged
    over images, and pooled over the data set (sums of intersections and sizes).
    lesion: binary Dice / IoU of the thresholded probability per image and pooled; lesion-level detection (a true
    lesion, i.e. a connected component of the mask, is found when a predicted component overlaps it with IoU >=
    0.1): sensitivity and false positives per image; ROI lesion coverage (true lesion pixels inside the predicted
    ROI box / all true lesion pixels) and ROI box fraction (ROI box area / area of the bounding box of the predicted
    breast, adipose + FGT + pectoral), with the count of ROI sources (fgt / breast / image). DM and CM (CDD-CESM
    low-energy vs contrast-enhanced) are reported apart.
    density (``--density-dir``, VinDr dense-tissue masks): FGT Dice per image and pooled, predicted percent density
    against the mask's (:func:`metrics.mask_percent_density`), absolute error in percentage points, Pearson r; the
    same for an Otsu-threshold baseline inside the predicted breast (:func:`otsu_fgt`).
    csaw (``--csaw-dir``, CSAW-S): pectoral Dice on images with a pectoral mask (MLO views), and the lesion metrics
    above against the ``cancer`` mask.
Everything is compared at the image's original resolution.
"""

from __future__ import annotations

import math

import numpy as np

from mammo import imaging
from mammo.core import labels
from mammo.core import metrics
from mammo.evaluation import plots
from mammo.evaluation.cases import Case, read_lesion_truth
from mammo.evaluation.predictors import LesionPrediction
from mammo.imaging import roi

TISSUE_CLASS_NAMES = labels.TISSUE_CLASS_NAMES
NUM_TISSUE_CLASSES = len(TISSUE_CLASS_NAMES)

#: Published reference on the DDSM tissue-label set (../shared/data/README.md; Tiryaki & Kaplanoglu, IRBM 2022,
#: 5-fold cross-validation on the same 60 images, 4-channel Dice including background).
PUBLISHED_TISSUE_DICE4 = {"ResNet50-U-net": {"mean": 0.851, "std": 0.021}, "VGG16-U-net": {"mean": 0.826},
                          "5-layer U-net": {"mean": 0.821}}

CONVENTIONS = {
    "empty_mask": ("Dice and IoU of a class (or lesion mask) absent from both prediction and truth are 1.0; absent "
                   "from the truth but predicted: 0.0 (metrics.py). Per-image means include such images; "
                   "'lesion_images_only' means leave lesion-free images out."),
    "dice_4channel": ("mean of the four per-class Dice values (background, adipose, FGT, pectoral), per image, then "
                      "averaged over images (Tiryaki & Kaplanoglu 2022); 'pooled' uses data-set sums per class"),
    "macro_dice": "mean of the per-class Dice over adipose, FGT and pectoral (background left out)",
    "pooled": "per class: 2 * sum(intersection) / (sum(|pred|) + sum(|truth|)) over all images (IoU likewise)",
    "lesion_threshold": "a pixel is lesion when its predicted probability >= the threshold",
    "lesion_detection": ("each 8-connected component of the truth mask of at least min_lesion_area_px pixels is one "
                         "lesion (smaller ones, and smaller predicted components, are ignored); it is found when a "
                         "predicted component overlaps it with IoU >= match_iou; a predicted component matching no "
                         "lesion at that IoU is a false positive; sensitivity = found / lesions over the set, "
                         "false_positives_per_image = false positives / images"),
    "roi_coverage": "true lesion pixels inside the predicted ROI box / all true lesion pixels (images with lesions)",
    "resolution": "predictions and truth are compared at the image's original resolution",
    "roi_box_fraction": ("area of the ROI box / area of the bounding box of the predicted breast (stage 1's "
                         "non-background pixels: adipose + FGT + pectoral), per image (all images, with or without a "
                         "lesion); 'pooled' = sum of ROI box areas / sum of breast box areas; can exceed 1 (margin, "
                         "minimum side, or the whole-image fallback); roi_sources counts how each ROI was chosen "
                         "(fgt, breast: no FGT predicted, image: no tissue predicted)"),
    "density_dev": ("FGT Dice = binary Dice of the predicted FGT class against the dense-tissue mask (> 127 of the "
                    "JPEG); predicted percent density = FGT / (adipose + FGT) of the prediction; mask percent "
                    "density = mask pixels / predicted adipose + FGT pixels (the breast outline is not annotated; as "
                    "in ../shared/FINDINGS.md); error = |predicted - mask| in percentage points; Pearson r over "
                    "images; 'pooled' Dice from summed counts"),
    "dense_pixels": ("model dense = the dense pixels of the predicted FGT region (imaging.dense_tissue: FGT-region "
                     "pixels of the preprocessed image above Otsu's level of the region), scored like the FGT class"),
    "otsu_baseline": ("FGT = predicted breast pixels (adipose + FGT) whose 8-bit intensity is above Otsu's level "
                      "(imaging.otsu_level) computed on the predicted breast pixels only; scored like the model"),
    "pectoral_dice": ("binary Dice of the predicted pectoral class against the CSAW-S pectoral_muscle mask, only on "
                      "images whose mask is not empty (MLO views); 'pooled' from summed counts"),
}


# --------------------------------------------------------------------------------------- tissue and lesion rows
def tissue_row(pred: np.ndarray, truth: np.ndarray) -> tuple[dict, np.ndarray]:
    """Per-image tissue metrics and the image's confusion matrix ``(4, 4)`` int64 (rows truth, columns prediction).

    Raises:
        ValueError: shapes differ (the message gives both).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction is {pred.shape[0]}x{pred.shape[1]} but the label map is "
                         f"{truth.shape[0]}x{truth.shape[1]}; predictions must be at the image's original size")
    confusion = metrics.confusion_counts(pred, truth, NUM_TISSUE_CLASSES)
    dice = metrics.dice_per_class(pred, truth, NUM_TISSUE_CLASSES)
    iou = metrics.iou_per_class(pred, truth, NUM_TISSUE_CLASSES)
    row = {f"dice_{name}": float(d) for name, d in zip(TISSUE_CLASS_NAMES, dice)}
    row.update({f"iou_{name}": float(v) for name, v in zip(TISSUE_CLASS_NAMES, iou)})
    row["macro_dice"] = float(dice[1:].mean())
    row["dice_4channel"] = float(dice.mean())
    row["pixel_accuracy"] = metrics.pixel_accuracy(pred, truth)
    row["percent_density_pred"] = metrics.percent_density(pred)
    row["percent_density_truth"] = metrics.percent_density(truth)
    return row, confusion


def summarize_tissue(rows: list[dict], confusion: np.ndarray) -> dict:
    """Means / std / median over images and pooled per-class Dice / IoU from the summed confusion matrix."""
    if not rows:
        return {"n_images": 0}
    keys = [k for k in rows[0] if isinstance(rows[0][k], float)]
    values = {k: np.array([r[k] for r in rows], float) for k in keys}
    intersection, pred_sum, truth_sum = np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1)
    dice = metrics.dice_from_counts(intersection, pred_sum, truth_sum)
    iou = metrics.iou_from_counts(intersection, pred_sum, truth_sum)
    density_error = np.abs(values["percent_density_pred"] - values["percent_density_truth"])
    return {
        "n_images": len(rows),
        "mean": {k: float(v.mean()) for k, v in values.items()},
        "std": {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()},
        "median": {k: float(np.median(v)) for k, v in values.items()},
        "pooled": {**{f"dice_{n}": float(d) for n, d in zip(TISSUE_CLASS_NAMES, dice)},
                   **{f"iou_{n}": float(v) for n, v in zip(TISSUE_CLASS_NAMES, iou)},
                   "macro_dice": float(dice[1:].mean()), "dice_4channel": float(dice.mean()),
                   "pixel_accuracy": float(intersection.sum() / max(confusion.sum(), 1))},
        "percent_density_abs_error_mean": float(density_error.mean()),
        "published_reference_dice_4channel": PUBLISHED_TISSUE_DICE4,
    }


def lesion_row(prob: np.ndarray, truth: np.ndarray, roi_box: roi.RoiBox | None, threshold: float,
               match_iou: float, min_area_px: int = 1, tissue_classes: np.ndarray | None = None,
               roi_source: str | None = None) -> dict:
    """Per-image lesion metrics: Dice / IoU of ``prob >= threshold``, counts, detection, ROI coverage, ROI box
    fraction.

    ``tissue_classes`` (``(H, W)`` stage-1 classes 0..3) gives the breast (non-background pixels) for
    ``roi_box_fraction`` (:func:`metrics.roi_box_fraction`, NaN without it or without a box) with the two areas in
    pixels (``roi_box_area_pixels``, ``breast_box_area_pixels``); ``roi_source`` is copied ("" when unknown).

    Raises:
        ValueError: ``prob`` and ``truth`` shapes differ.
    """
    if prob.shape != truth.shape:
        raise ValueError(f"lesion probability is {prob.shape[0]}x{prob.shape[1]} but the mask is "
                         f"{truth.shape[0]}x{truth.shape[1]}; predictions must be at the image's original size")
    pred = prob >= threshold
    row = {"dice": metrics.binary_dice(pred, truth), "iou": metrics.binary_iou(pred, truth),
           "intersection_pixels": int(np.logical_and(pred, truth).sum()), "pred_pixels": int(pred.sum()),
           "truth_pixels": int(truth.sum()), "has_lesion": bool(truth.any())}
    row.update(metrics.lesion_detection(pred, truth, iou_threshold=match_iou, min_area_px=min_area_px))
    row["roi_truth_pixels_inside"] = float("nan")
    row["roi_coverage"] = float("nan")
    if roi_box is not None:
        inside = int(truth[roi_box.slices()].sum())
        row["roi_truth_pixels_inside"] = float(inside)
        row["roi_coverage"] = inside / row["truth_pixels"] if row["truth_pixels"] else float("nan")
    row.update(roi_box_fields(roi_box, tissue_classes))
    row["roi_source"] = roi_source or ""
    return row


def roi_box_fields(roi_box: roi.RoiBox | None, tissue_classes: np.ndarray | None) -> dict:
    """``roi_box_fraction`` (:func:`metrics.roi_box_fraction` with the breast = ``tissue_classes != 0``, i.e.
    adipose + FGT + pectoral of stage 1), ``roi_box_area_pixels`` and ``breast_box_area_pixels``; NaN where the box
    or the map is missing or no breast pixel is predicted."""
    nan = float("nan")
    if roi_box is None or tissue_classes is None:
        return {"roi_box_fraction": nan, "roi_box_area_pixels": nan, "breast_box_area_pixels": nan}
    breast = np.asarray(tissue_classes) != labels.BACKGROUND
    breast_box = metrics.bounding_box(breast)
    return {"roi_box_fraction": metrics.roi_box_fraction(roi_box, breast),
            "roi_box_area_pixels": float(metrics.box_area(roi_box)),
            "breast_box_area_pixels": float(metrics.box_area(breast_box)) if breast_box else nan}


def summarize_lesion(rows: list[dict]) -> dict:
    """Set-level lesion metrics of ``rows`` (see :data:`CONVENTIONS`)."""
    if not rows:
        return {"n_images": 0}
    with_lesion = [r for r in rows if r["has_lesion"]]
    sums = {k: sum(r[k] for r in rows) for k in ("intersection_pixels", "pred_pixels", "truth_pixels", "lesions",
                                                 "found", "detections", "false_positives")}
    covered = [r for r in with_lesion if not math.isnan(r["roi_coverage"])]
    counts = (sums["intersection_pixels"], sums["pred_pixels"], sums["truth_pixels"])

    def mean(key, items):
        return float(np.mean([r[key] for r in items])) if items else float("nan")

    return {
        "n_images": len(rows),
        "n_lesion_images": len(with_lesion),
        "dice_mean": mean("dice", rows),
        "iou_mean": mean("iou", rows),
        "dice_mean_lesion_images_only": mean("dice", with_lesion),
        "iou_mean_lesion_images_only": mean("iou", with_lesion),
        "dice_pooled": float(metrics.dice_from_counts(*counts)),
        "iou_pooled": float(metrics.iou_from_counts(*counts)),
        "lesions": sums["lesions"],
        "lesions_found": sums["found"],
        "sensitivity": sums["found"] / sums["lesions"] if sums["lesions"] else float("nan"),
        "false_positives": sums["false_positives"],
        "false_positives_per_image": sums["false_positives"] / len(rows),
        "roi_coverage_mean": mean("roi_coverage", covered),
        "roi_coverage_pooled": (sum(r["roi_truth_pixels_inside"] for r in covered)
                                / sum(r["truth_pixels"] for r in covered) if covered else float("nan")),
        "roi_coverage_images": len(covered),
        **summarize_roi_box(rows),
    }


def summarize_roi_box(rows: list[dict]) -> dict:
    """ROI box fraction over ``rows`` (all images where it is known): ``roi_box_fraction_mean`` (per image),
    ``roi_box_fraction_pooled`` (summed areas), ``roi_box_fraction_images`` and ``roi_sources`` (images per ROI
    source: fgt / breast / image; see :data:`CONVENTIONS`)."""
    known = [r for r in rows if not math.isnan(r.get("roi_box_fraction", float("nan")))]
    sources = {name: sum(1 for r in rows if r.get("roi_source") == name) for name in ("fgt", "breast", "image")}
    return {
        "roi_box_fraction_mean": float(np.mean([r["roi_box_fraction"] for r in known])) if known else float("nan"),
        "roi_box_fraction_pooled": (sum(r["roi_box_area_pixels"] for r in known)
                                    / sum(r["breast_box_area_pixels"] for r in known)) if known else float("nan"),
        "roi_box_fraction_images": len(known),
        "roi_sources": sources,
    }


def summarize_lesion_by_group(rows: list[dict]) -> dict:
    """:func:`summarize_lesion` over all ``rows`` (``"all"``) and over each acquisition group found (``"CM"``,
    ``"DM"``)."""
    groups = sorted({r["group"] for r in rows if r["group"]})
    return {"all": summarize_lesion(rows),
            **{g: summarize_lesion([r for r in rows if r["group"] == g]) for g in groups}}


# -------------------------------------------------------------------------------------- tissue and lesion loops
def evaluate_tissue(cases: list[Case], predictor, worst_n: int, thumb_side: int, skipped: list, progress=None):
    """Tissue metrics over ``cases``: ``(rows, confusion (4, 4), thumbnails of the worst cases)``; bad items are
    appended to ``skipped`` and the rest goes on.

    ``predictor`` is a :class:`predictors.FolderPredictions` or :class:`predictors.CascadePredictions`;
    ``progress`` wraps the case list (a tqdm bar) when given. Thumbnails (:func:`plots.case_thumb`) are at most
    ``thumb_side`` pixels.
    """
    rows, thumbs = [], []
    confusion = np.zeros((NUM_TISSUE_CLASSES, NUM_TISSUE_CLASSES), np.int64)
    for case in progress(cases) if progress else cases:
        try:
            pixels = imaging.read_image(case.image_path).pixels
            truth = imaging.read_mask(case.truth_path, kind="tissue")
            if truth.shape != pixels.shape:
                raise ValueError(f"label map {case.truth_path} is {truth.shape} but the image is {pixels.shape}")
            pred = predictor.tissue(case, pixels)
            row, counts = tissue_row(pred, truth)
        except (OSError, ValueError, RuntimeError, imaging.ImageReadError) as error:
            skipped.append({"task": "tissue", "image": case.image_path, "reason": f"{type(error).__name__}: {error}"})
            continue
        confusion += counts
        rows.append({"task": "tissue", "stem": case.stem, "group": case.group, "image_file_path": case.image_path,
                     **row})
        thumbs.append(plots.case_thumb(case.stem, row["macro_dice"], pixels, truth, pred, thumb_side))
        plots.keep_worst(thumbs, worst_n)
    return rows, confusion, thumbs


def evaluate_lesion(cases: list[Case], predictor, threshold: float, match_iou: float, min_area_px: int, worst_n: int,
                    thumb_side: int, skipped: list, progress=None):
    """Lesion metrics over ``cases``: ``(rows, thumbnails of the worst cases)``; bad items go to ``skipped``."""
    rows, thumbs = [], []
    for case in progress(cases) if progress else cases:
        try:
            pixels = imaging.read_image(case.image_path).pixels
            truth = read_lesion_truth(case, pixels.shape)
            predicted = predictor.lesion(case, pixels)
            row = lesion_row(predicted.prob, truth, predicted.roi_box, threshold, match_iou, min_area_px,
                             predicted.tissue_classes, predicted.roi_source)
        except (OSError, ValueError, RuntimeError, imaging.ImageReadError) as error:
            skipped.append({"task": "lesion", "image": case.image_path, "reason": f"{type(error).__name__}: {error}"})
            continue
        rows.append({"task": "lesion", "stem": case.stem, "group": case.group, "image_file_path": case.image_path,
                     **row})
        if row["has_lesion"] or row["pred_pixels"]:
            thumbs.append(plots.case_thumb(case.stem, row["dice"], pixels, truth.astype(np.uint8),
                                                      (predicted.prob >= threshold).astype(np.uint8), thumb_side,
                                                      predicted.roi_box))
            plots.keep_worst(thumbs, worst_n)
    return rows, thumbs


# ------------------------------------------------------------------------------------------------------ density
def otsu_fgt(pixels: np.ndarray, tissue_classes: np.ndarray) -> tuple[np.ndarray, int]:
    """The Otsu-threshold FGT baseline: predicted breast pixels brighter than Otsu's level of the breast pixels.

    Breast = adipose + FGT of ``tissue_classes`` (pectoral and background left out, as in percent density). The
    level is :func:`imaging.otsu_level` (Otsu 1979, as ``cv2.THRESH_OTSU``) of the 256-bin histogram of the breast
    pixels of ``imaging.scale_to_uint8(pixels)`` (8-bit images unchanged); a pixel is FGT when its value is > level.

    Args:
        pixels: ``(H, W)`` uint8 or uint16 image as read.
        tissue_classes: ``(H, W)`` integer class map 0..3 of the prediction.

    Returns:
        ``(fgt, level)``: ``(H, W)`` bool mask and the 8-bit level (0 and an empty mask when no breast is predicted).
    """
    if pixels.shape != tissue_classes.shape:
        raise ValueError(f"image shape {pixels.shape} differs from the tissue map shape {tissue_classes.shape}")
    breast = (tissue_classes == labels.ADIPOSE) | (tissue_classes == labels.FGT)
    if not breast.any():
        return np.zeros(pixels.shape, bool), 0
    image8 = imaging.scale_to_uint8(pixels)
    level = imaging.otsu_level(np.bincount(image8[breast], minlength=256))
    return breast & (image8 > level), level


def pectoral_fraction(tissue_classes: np.ndarray) -> float:
    """The share of the breast (every non-background pixel) labelled pectoral muscle, in [0, 1]; 0 for no breast.
    A muscle is 10-25 % of an MLO view and absent from a CC view (issue 19's anatomy)."""
    breast = int(np.count_nonzero(tissue_classes != labels.BACKGROUND))
    return int(np.count_nonzero(tissue_classes == labels.PECTORAL)) / breast if breast else 0.0


def density_row(pixels: np.ndarray, pred: np.ndarray, dense: np.ndarray, model_dense: np.ndarray | None = None) -> dict:
    """Per-image density metrics of the model's tissue map ``pred`` (its FGT region, and with ``model_dense`` the
    model's dense-tissue mask, prefixed ``dense_``) and of the :func:`otsu_fgt` baseline.

    Args:
        pixels: ``(H, W)`` image as read; pred: ``(H, W)`` class map 0..3; dense: ``(H, W)`` bool dense-tissue mask;
        model_dense: ``(H, W)`` bool, the model's dense pixels (inference's ``<stem>_dense_mask.png``; None: no
            ``dense_`` figures).

    Returns:
        dict: ``fgt_dice`` and its counts (``fgt_intersection_pixels``, ``fgt_pred_pixels``, ``fgt_truth_pixels``),
        ``breast_pixels`` (adipose + FGT predicted), ``percent_density_pred`` / ``percent_density_mask`` (%),
        ``density_abs_error`` (percentage points); the same prefixed ``otsu_`` for the baseline, and ``otsu_level``.
        See :data:`CONVENTIONS` ``density_dev``.

    Raises:
        ValueError: shapes differ.
    """
    if not (pixels.shape == pred.shape == dense.shape):
        raise ValueError(f"image {pixels.shape}, prediction {pred.shape} and dense-tissue mask {dense.shape} must have "
                         "one size; predictions must be at the image's original size")
    dense = dense.astype(bool)
    mask_density = metrics.mask_percent_density(dense, pred)
    otsu, level = otsu_fgt(pixels, pred)
    row = {"breast_pixels": int(((pred == labels.ADIPOSE) | (pred == labels.FGT)).sum()),
           "percent_density_mask": mask_density, "pectoral_fraction": pectoral_fraction(pred)}
    breast = row["breast_pixels"]
    variants = [("", pred == labels.FGT), ("otsu_", otsu)]
    if model_dense is not None:
        if model_dense.shape != pred.shape:
            raise ValueError(f"the model's dense mask {model_dense.shape} and tissue map {pred.shape} differ in size")
        variants.append(("dense_", model_dense.astype(bool)))
    for prefix, fgt in variants:
        density = 100.0 * int(fgt.sum()) / breast if breast else float("nan")
        row.update({f"{prefix}fgt_dice": metrics.binary_dice(fgt, dense),
                    f"{prefix}fgt_intersection_pixels": int((fgt & dense).sum()),
                    f"{prefix}fgt_pred_pixels": int(fgt.sum()), f"{prefix}fgt_truth_pixels": int(dense.sum()),
                    f"{prefix}percent_density_pred": density,
                    f"{prefix}density_abs_error": abs(density - mask_density)})
    row["otsu_level"] = int(level)
    return row


def _spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0.0 for one value) over the finite values; NaN when none."""
    array = np.array([v for v in values if math.isfinite(v)], float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=1)) if array.size > 1 else 0.0


def summarize_density(rows: list[dict]) -> dict:
    """Set-level density figures of :func:`density_row` rows, for the model (``model``) and the Otsu baseline
    (``otsu_baseline``): FGT Dice mean / sd over images and pooled, mean predicted density, mean absolute density
    error (percentage points) and its sd, Pearson r of predicted vs mask density. Images without a predicted breast
    (mask density undefined) are left out of the density figures (``density_images`` counts the rest)."""
    if not rows:
        return {"n_images": 0}
    known = [r for r in rows if math.isfinite(r["percent_density_mask"])]
    mask_density = [r["percent_density_mask"] for r in known]
    out = {"n_images": len(rows), "density_images": len(known),
           "percent_density_mask_mean": _spread(mask_density)[0],
           "pectoral_fraction_mean": _spread([r["pectoral_fraction"] for r in rows])[0],
           "pectoral_fraction_max": max(r["pectoral_fraction"] for r in rows)}
    variants = [("model", ""), ("otsu_baseline", "otsu_")] + (
        [("model_dense_pixels", "dense_")] if all("dense_fgt_dice" in r for r in rows) else [])
    for name, prefix in variants:
        dice_mean, dice_std = _spread([r[f"{prefix}fgt_dice"] for r in rows])
        error_mean, error_std = _spread([r[f"{prefix}density_abs_error"] for r in known])
        sums = [sum(r[f"{prefix}fgt_{k}_pixels"] for r in rows) for k in ("intersection", "pred", "truth")]
        out[name] = {"fgt_dice_mean": dice_mean, "fgt_dice_std": dice_std,
                     "fgt_dice_pooled": float(metrics.dice_from_counts(*sums)),
                     "percent_density_mean": _spread([r[f"{prefix}percent_density_pred"] for r in known])[0],
                     "density_abs_error_mean": error_mean, "density_abs_error_std": error_std,
                     "density_pearson_r": metrics.pearson_r([r[f"{prefix}percent_density_pred"] for r in known],
                                                            mask_density)}
    return out


def evaluate_density(cases: list[Case], predictor, skipped: list, progress=None) -> list[dict]:
    """Density rows (``task`` "density") over ``cases`` (:func:`density_cases`); bad items go to ``skipped``."""
    rows = []
    for case in progress(cases) if progress else cases:
        try:
            pixels = imaging.read_image(case.image_path).pixels
            dense = imaging.read_mask(case.truth_path, kind="binary").astype(bool)
            if dense.shape != pixels.shape:
                raise ValueError(f"mask {case.truth_path} is {dense.shape} but the image is {pixels.shape}")
            pred = predictor.tissue(case, pixels)
            row = density_row(pixels, pred, dense, predictor.dense_tissue(case, pixels, pred))
        except (OSError, ValueError, RuntimeError, imaging.ImageReadError) as error:
            skipped.append({"task": "density", "image": case.image_path, "reason": f"{type(error).__name__}: {error}"})
            continue
        rows.append({"task": "density", "stem": case.stem, "group": case.group, "image_file_path": case.image_path,
                     **row})
    return rows


# --------------------------------------------------------------------------------------------------------- csaw
def csaw_row(predicted: LesionPrediction, truth: np.ndarray, pectoral: np.ndarray | None, threshold: float,
             match_iou: float, min_area_px: int) -> dict:
    """Per-image CSAW-S metrics: :func:`lesion_row` against the cancer mask (with the ROI box fraction), and the
    pectoral Dice (predicted class 3 vs the pectoral mask; NaN when ``pectoral`` is None or empty, i.e. a CC view)
    with its counts. ``predicted.tissue_classes`` must be set."""
    if predicted.tissue_classes is None:
        raise ValueError("the prediction has no stage-1 tissue map (a predictions folder needs <stem>_tissue_seg.png)")
    row = lesion_row(predicted.prob, truth, predicted.roi_box, threshold, match_iou, min_area_px,
                     predicted.tissue_classes, predicted.roi_source)
    pred = predicted.tissue_classes == labels.PECTORAL
    scored = pectoral is not None and bool(pectoral.any())
    row.update({"has_pectoral": scored,
                "pectoral_dice": metrics.binary_dice(pred, pectoral) if scored else float("nan"),
                "pectoral_intersection_pixels": int((pred & pectoral).sum()) if scored else 0,
                "pectoral_pred_pixels": int(pred.sum()) if scored else 0,
                "pectoral_truth_pixels": int(pectoral.sum()) if scored else 0,
                "pectoral_fraction": pectoral_fraction(predicted.tissue_classes)})
    return row


def summarize_csaw(rows: list[dict]) -> dict:
    """CSAW-S summary: patients, ``pectoral`` (Dice mean / sd over MLO images, pooled, and per image) and
    ``lesion`` (:func:`summarize_lesion`, with ROI coverage and ROI box fraction)."""
    if not rows:
        return {"n_images": 0}
    mlo = [r for r in rows if r["has_pectoral"]]
    cc = [r for r in rows if not r["has_pectoral"]]  # CSAW-S: an empty pectoral mask is a CC view
    mean, std = _spread([r["pectoral_dice"] for r in mlo])
    sums = [sum(r[f"pectoral_{k}_pixels"] for r in mlo) for k in ("intersection", "pred", "truth")]
    return {"n_images": len(rows), "patients": sorted({r["patient"] for r in rows}),
            "pectoral": {"n_images": len(mlo), "dice_mean": mean, "dice_std": std,
                         "dice_pooled": float(metrics.dice_from_counts(*sums)) if mlo else float("nan"),
                         "per_image": {r["stem"]: r["pectoral_dice"] for r in mlo},
                         "fraction_cc_mean": _spread([r["pectoral_fraction"] for r in cc])[0] if cc else float("nan"),
                         "fraction_cc_max": max((r["pectoral_fraction"] for r in cc), default=float("nan")),
                         "fraction_max": max(r["pectoral_fraction"] for r in rows)},
            "lesion": summarize_lesion(rows)}


def evaluate_csaw(cases: list[Case], predictor, threshold: float, match_iou: float, min_area_px: int,
                  skipped: list, progress=None) -> list[dict]:
    """CSAW-S rows (``task`` "csaw") over ``cases`` (:func:`csaw_cases`); bad items go to ``skipped``."""
    rows = []
    for case in progress(cases) if progress else cases:
        try:
            pixels = imaging.read_image(case.image_path).pixels
            truth = read_lesion_truth(case, pixels.shape)
            pectoral = None
            if case.pectoral_path:
                pectoral = imaging.read_mask(case.pectoral_path, kind="binary").astype(bool)
                if pectoral.shape != pixels.shape:
                    raise ValueError(f"mask {case.pectoral_path} is {pectoral.shape} but the image is {pixels.shape}")
            predicted = predictor.lesion(case, pixels)
            row = csaw_row(predicted, truth, pectoral, threshold, match_iou, min_area_px)
        except (OSError, ValueError, RuntimeError, imaging.ImageReadError) as error:
            skipped.append({"task": "csaw", "image": case.image_path, "reason": f"{type(error).__name__}: {error}"})
            continue
        rows.append({"task": "csaw", "stem": case.stem, "group": case.group, "patient": case.patient,
                     "image_file_path": case.image_path, **row})
    return rows
