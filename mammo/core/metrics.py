"""Segmentation metrics on hard label maps: per-class Dice and IoU, pixel accuracy, binary Dice / IoU, density.

Inputs are NumPy arrays or torch tensors of class indices (or booleans for the binary functions); they are
compared element-wise, so prediction and truth must have the same shape.

Empty-mask convention (stated once, used everywhere in the suite): when a class is absent from both the
prediction and the truth, its Dice and IoU are **1.0** (nothing to find, nothing falsely found; the convention of
nnU-Net's evaluation when ``ignore empty`` is off). When it is absent from the truth but predicted, Dice and IoU are
0.0. Aggregates over images therefore never see NaN. Pooled metrics (sum of intersections over sum of unions over a
data set) are given by the ``*_from_counts`` helpers.
"""

from __future__ import annotations

import sys

import numpy as np

#: Density category thresholds on percent density (FGT area / breast area, in %) used by this suite's reports.
#: Quartiles of percent density as in Wolfe-style / BI-RADS 4th edition (ACR 2003): <25 % (a, almost entirely fatty),
#: 25-50 % (b, scattered fibroglandular), 51-75 % (c, heterogeneously dense), >75 % (d, extremely dense).
DENSITY_THRESHOLDS_PERCENT = (25.0, 50.0, 75.0)
DENSITY_CATEGORIES = ("A", "B", "C", "D")


def _as_numpy(array) -> np.ndarray:
    torch = sys.modules.get("torch")  # a tensor exists only where torch is loaded: no import (the ONNX route has none)
    if torch is not None and isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def confusion_counts(pred, target, num_classes: int) -> np.ndarray:
    """Confusion matrix ``(num_classes, num_classes)`` int64, rows = truth, columns = prediction.

    Args:
        pred, target: integer class maps of identical shape, values in ``[0, num_classes)``.

    Raises:
        ValueError: shapes differ or a value lies outside ``[0, num_classes)``.
    """
    pred = _as_numpy(pred).astype(np.int64).ravel()
    target = _as_numpy(target).astype(np.int64).ravel()
    if pred.shape != target.shape:
        raise ValueError(f"prediction has {pred.size} pixels but truth has {target.size}; they must match")
    for name, values in (("prediction", pred), ("truth", target)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} holds class values outside [0, {num_classes}): {np.unique(values)[:10]}")
    return np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def dice_from_counts(intersection, pred_sum, truth_sum) -> np.ndarray:
    """Dice ``2|P∩T| / (|P| + |T|)`` from counts (arrays broadcast), 1.0 where both are empty."""
    intersection, denominator = (np.asarray(intersection, float),
                                 np.asarray(pred_sum, float) + np.asarray(truth_sum, float))
    return np.where(denominator > 0, 2 * intersection / np.maximum(denominator, 1e-12), 1.0)


def iou_from_counts(intersection, pred_sum, truth_sum) -> np.ndarray:
    """IoU ``|P∩T| / |P∪T|`` from counts, 1.0 where both are empty."""
    intersection = np.asarray(intersection, float)
    union = np.asarray(pred_sum, float) + np.asarray(truth_sum, float) - intersection
    return np.where(union > 0, intersection / np.maximum(union, 1e-12), 1.0)


def _per_class_counts(pred, target, num_classes: int):
    cm = confusion_counts(pred, target, num_classes)
    return np.diag(cm), cm.sum(axis=0), cm.sum(axis=1)


def dice_per_class(pred, target, num_classes: int) -> np.ndarray:
    """Dice of each class, shape ``(num_classes,)`` float64, empty/empty = 1.0."""
    return dice_from_counts(*_per_class_counts(pred, target, num_classes))


def iou_per_class(pred, target, num_classes: int) -> np.ndarray:
    """IoU (Jaccard) of each class, shape ``(num_classes,)`` float64, empty/empty = 1.0."""
    return iou_from_counts(*_per_class_counts(pred, target, num_classes))


def pixel_accuracy(pred, target) -> float:
    """Share of pixels whose predicted class equals the truth (1.0 for zero pixels)."""
    pred, target = _as_numpy(pred), _as_numpy(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {target.shape}")
    return float((pred == target).mean()) if pred.size else 1.0


def binary_dice(pred, truth) -> float:
    """Dice of two binary masks (nonzero = foreground); 1.0 when both are empty, 0.0 when only one is."""
    pred, truth = _as_numpy(pred).astype(bool), _as_numpy(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return float(dice_from_counts(np.logical_and(pred, truth).sum(), pred.sum(), truth.sum()))


def binary_iou(pred, truth) -> float:
    """IoU of two binary masks; 1.0 when both are empty, 0.0 when only one is."""
    pred, truth = _as_numpy(pred).astype(bool), _as_numpy(truth).astype(bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth shape {truth.shape}")
    return float(iou_from_counts(np.logical_and(pred, truth).sum(), pred.sum(), truth.sum()))


def percent_density(tissue_classes, adipose_class: int = 1, fgt_class: int = 2) -> float:
    """Percent mammographic density: FGT area / breast area x 100, in %.

    Breast area = adipose + FGT pixels of the 4-class map (0 background, 1 adipose, 2 FGT, 3 pectoral): the pectoral
    muscle is not breast tissue and is left out, as in area-based density (Byng et al. 1994; Tiryaki & Kaplanoglu
    2022 compute density from the same two classes). Returns 0.0 when no breast pixel exists.
    """
    classes = _as_numpy(tissue_classes)
    fgt_area = int((classes == fgt_class).sum())
    breast_area = fgt_area + int((classes == adipose_class).sum())
    return 100.0 * fgt_area / breast_area if breast_area else 0.0


def density_category(percent: float) -> str:
    """Map percent density to "A".."D" with :data:`DENSITY_THRESHOLDS_PERCENT` (upper bounds inclusive)."""
    for threshold, category in zip(DENSITY_THRESHOLDS_PERCENT, DENSITY_CATEGORIES):
        if percent <= threshold:
            return category
    return DENSITY_CATEGORIES[-1]


#: IoU a predicted connected component must reach with a true lesion for that lesion to count as found (lesion-level
#: detection). 0.1 is a lenient overlap criterion of our choice: a detection only has to land on the lesion, not to
#: delineate it (segmentation quality is measured by Dice / IoU separately).
LESION_MATCH_IOU = 0.1


def _components(mask: np.ndarray, connectivity: int, min_area_px: int) -> tuple[int, np.ndarray]:
    """Connected components of at least ``min_area_px`` pixels: ``(count + 1, labels)`` with labels 1..count."""
    import cv2

    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=connectivity)
    keep = np.bincount(labels.ravel(), minlength=count) >= max(1, int(min_area_px))
    keep[0] = False
    new_ids = np.zeros(count, np.int64)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1)
    return int(keep.sum()) + 1, new_ids[labels]


def lesion_detection(pred, truth, iou_threshold: float = LESION_MATCH_IOU, connectivity: int = 8,
                     min_area_px: int = 1) -> dict:
    """Lesion-level detection counts from two binary masks, by matching connected components.

    Each 8-connected (or 4-connected) component of ``truth`` is one lesion; each component of ``pred`` is one
    detection. A lesion is *found* when some detection overlaps it with IoU >= ``iou_threshold`` (IoU of the two
    components as pixel sets). A detection is a *false positive* when it reaches that IoU with no lesion.
    Empty masks: no lesion and no detection gives zeros everywhere (sensitivity is then undefined for this image;
    aggregate ``found`` / ``lesions`` over images).

    Args:
        pred, truth: binary masks of identical shape (nonzero = foreground).
        iou_threshold: matching threshold in (0, 1] (default :data:`LESION_MATCH_IOU` = 0.1).
        connectivity: 8 or 4 (pixel connectivity of a component).
        min_area_px: components (true or predicted) smaller than this many pixels are neither lesions nor
            detections, e.g. specks that JPEG compression leaves in thresholded masks (default 1: all count).

    Returns:
        dict of ints: ``lesions`` (true components), ``found`` (lesions matched), ``detections`` (predicted
        components), ``false_positives`` (detections matching no lesion).

    Raises:
        ValueError: shapes differ, masks are not 2-D, or a bad threshold / connectivity.
    """
    pred, truth = _as_numpy(pred).astype(bool), _as_numpy(truth).astype(bool)
    if pred.shape != truth.shape or pred.ndim != 2:
        raise ValueError(f"lesion_detection needs two 2-D masks of one shape, got {pred.shape} and {truth.shape}")
    if not 0 < iou_threshold <= 1 or connectivity not in (4, 8):
        raise ValueError(f"iou_threshold must be in (0, 1] and connectivity 4 or 8, "
                         f"got {iou_threshold}, {connectivity}")
    n_truth, truth_labels = _components(truth, connectivity, min_area_px)
    n_pred, pred_labels = _components(pred, connectivity, min_area_px)
    # joint histogram of (truth label, prediction label): row 0 / column 0 are the backgrounds
    joint = np.bincount((truth_labels.astype(np.int64) * n_pred + pred_labels).ravel(),
                        minlength=n_truth * n_pred).reshape(n_truth, n_pred)
    intersection = joint[1:, 1:].astype(float)
    truth_area, pred_area = joint[1:, :].sum(axis=1), joint[:, 1:].sum(axis=0)
    iou = intersection / np.maximum(truth_area[:, None] + pred_area[None, :] - intersection, 1)
    matched = iou >= iou_threshold
    return {"lesions": int(n_truth - 1), "found": int(matched.any(axis=1).sum()),
            "detections": int(n_pred - 1), "false_positives": int((~matched.any(axis=0)).sum())}


# ------------------------------------------------------------------------------------------------ domain evaluation
def bounding_box(mask) -> tuple[int, int, int, int] | None:
    """Half-open bounding box ``(y0, x0, y1, x1)`` in pixels of the nonzero pixels of a 2-D mask; None when empty."""
    mask = _as_numpy(mask).astype(bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def box_area(box) -> int:
    """Area in pixels of a half-open box: a ``(y0, x0, y1, x1)`` sequence or an object with those attributes
    (``roi.RoiBox``); 0 for an empty or inverted box."""
    if hasattr(box, "y0"):
        box = (box.y0, box.x0, box.y1, box.x1)
    y0, x0, y1, x1 = (int(v) for v in box)
    return max(0, y1 - y0) * max(0, x1 - x0)


def roi_box_fraction(roi_box, breast_mask) -> float:
    """Area of the stage-2 ROI box / area of the breast's bounding box (a ratio, not a percentage).

    How much of the breast's extent stage 2 is shown: 1.0 = the whole breast box, small values = a tight crop. It can
    exceed 1 where the ROI's margin or minimum side reaches beyond the breast box, or where the ROI fell back to the
    whole image. Defined by this suite (the ROI rule is ``roi.fgt_roi_box``).

    Args:
        roi_box: ``(y0, x0, y1, x1)`` half-open, in pixels, or a ``roi.RoiBox``.
        breast_mask: ``(H, W)`` bool (or 0/1) mask of the breast; in evaluation the predicted non-background pixels
            of stage 1 (adipose + FGT + pectoral).

    Returns:
        The ratio (float); NaN when the breast mask is empty (no breast box).
    """
    breast_box = bounding_box(breast_mask)
    if breast_box is None:
        return float("nan")
    return box_area(roi_box) / box_area(breast_box)


def mask_percent_density(dense_mask, tissue_classes, adipose_class: int = 1, fgt_class: int = 2) -> float:
    """Percent density of a dense-tissue mask, in %: all mask pixels / predicted breast pixels x 100.

    Breast pixels are the adipose + FGT pixels of the predicted 4-class map (``tissue_classes``), the same denominator
    as :func:`percent_density` of the prediction, so the two differ only in their numerators. This is how
    ``../shared/FINDINGS.md`` (2026-11-30) measured the density error on VinDr density masks, whose breast outline is
    not given; kept so that numbers stay comparable. Mask pixels outside the predicted breast still count, so the
    value can exceed 100 when stage 1 misses breast.

    Args:
        dense_mask: ``(H, W)`` bool / 0-1 dense-tissue mask.
        tissue_classes: ``(H, W)`` integer class map of the prediction (0 background, 1 adipose, 2 FGT, 3 pectoral).

    Returns:
        Percent (float); NaN when the prediction holds no breast pixel (undefined).

    Raises:
        ValueError: shapes differ.
    """
    dense, classes = _as_numpy(dense_mask).astype(bool), _as_numpy(tissue_classes)
    if dense.shape != classes.shape:
        raise ValueError(f"dense-tissue mask shape {dense.shape} differs from the tissue map shape {classes.shape}")
    breast = int(((classes == adipose_class) | (classes == fgt_class)).sum())
    return 100.0 * int(dense.sum()) / breast if breast else float("nan")


def pearson_r(x, y) -> float:
    """Pearson correlation coefficient of two equally long 1-D sequences, over the pairs where both are finite.

    Returns a value in [-1, 1]; NaN when fewer than 2 finite pairs remain or either sequence is constant
    (undefined).
    """
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pearson_r needs sequences of one length, got {x.size} and {y.size}")
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    # clipped: rounding can put a perfect correlation a hair beyond +-1
    return float(np.clip((dx * dy).sum() / denominator, -1.0, 1.0)) if denominator > 0 else float("nan")
