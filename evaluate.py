"""Accuracy of the cascade against ground truth: tissue Dice / IoU / accuracy, lesion Dice / IoU and detection.

Predictions come either from a folder written by ``cascade_inference.py`` (``--predictions-dir``:
``<stem>_tissue_seg.png`` class indices 0..3, ``<stem>_cancer_prob.png`` lesion probability, ``<stem>.json`` with
the ROI box) or from running the cascade here (``--stage1-weights`` / ``--stage2-weights``, ``--backend torch`` or
``onnxruntime``) on the ground-truth images. Everything is compared at the image's original resolution.

Ground truth:
    tissue: ``--tissue-dir`` (DDSM tissue-label layout ``fgt_seg/`` + ``fgt_seg_labels/``) or ``--tissue-csv``
    (the workspace's ``tissue_dataset.csv``); lesion: ``--lesion-csv`` (``unified_segmentation_dataset.csv``) or
    ``--lesion-dir`` (``images/`` + ``masks/``; ``masks/<stem>.*`` or ``masks/<stem>_*.*``, merged by union; an image
    without a mask is lesion-free). ``--split`` keeps one split of a CSV.

Outputs in ``--output-dir``: ``metrics.json`` (summary, conventions, skipped items), ``per_image.csv`` (one row
per image and task) and ``plots/`` (per-class Dice distribution, worst cases with overlays).

Metrics (all computed with :mod:`metrics`):
    tissue: per-class Dice and IoU (background, adipose, FGT, pectoral), macro Dice (mean over adipose, FGT,
    pectoral), pixel accuracy, and the 4-channel Dice (mean of the four per-class Dice values including background:
    the figure Tiryaki & Kaplanoglu, IRBM 2022 report for the DDSM tissue-label set); each per image and averaged
    over images, and pooled over the data set (sums of intersections and sizes).
    lesion: binary Dice / IoU of the thresholded probability per image and pooled; lesion-level detection (a true
    lesion, i.e. a connected component of the mask, is found when a predicted component overlaps it with IoU >=
    0.1): sensitivity and false positives per image; ROI lesion coverage (true lesion pixels inside the predicted
    ROI box / all true lesion pixels). DM and CM (CDD-CESM low-energy vs contrast-enhanced) are reported apart.

Example::

    python evaluate.py --tissue-dir ../shared/data/tissue/train_valid --lesion-dir ../shared/data/lesion_cdd_cesm \\
        --stage1-weights checkpoints/stage1/best_stage1.pth --stage2-weights checkpoints/stage2/best_stage2.pth \\
        --backend onnxruntime --output-dir evaluation/
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import cascade
import cli
import fileio
import imaging
import labels
import metrics
import roi
import runners

TISSUE_CLASS_NAMES = labels.TISSUE_CLASS_NAMES
NUM_TISSUE_CLASSES = len(TISSUE_CLASS_NAMES)

#: Lesion probability at or above which a pixel counts as lesion (the usual 0.5 for a sigmoid output).
LESION_THRESHOLD = 0.5

#: Published reference on the DDSM tissue-label set (../shared/data/README.md; Tiryaki & Kaplanoglu, IRBM 2022,
#: 5-fold cross-validation on the same 60 images, 4-channel Dice including background).
PUBLISHED_TISSUE_DICE4 = {"ResNet50-U-net": {"mean": 0.851, "std": 0.021}, "VGG16-U-net": {"mean": 0.826},
                          "5-layer U-net": {"mean": 0.821}}

#: Smallest component (pixels) counted as a lesion or a detection. The CDD-CESM masks are JPEG files: thresholded at
#: 127, 8 of their 214 components are 1-3 px specks, and the smallest real lesion is 25 px (measured on all 98 masks).
MIN_LESION_AREA_PX = 10

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
                         "lesion (smaller ones, and smaller predicted components, are ignored); it is found when a predicted "
                         "component overlaps it with IoU >= match_iou; a predicted component matching no lesion at "
                         "that IoU is a false positive; sensitivity = found / lesions over the set, "
                         "false_positives_per_image = false positives / images"),
    "roi_coverage": "true lesion pixels inside the predicted ROI box / all true lesion pixels (images with lesions)",
    "resolution": "predictions and truth are compared at the image's original resolution",
}


# ------------------------------------------------------------------------------------------------ ground truth
@dataclass
class Case:
    """One ground-truth item: the image, its truth file(s) and its acquisition group ("DM", "CM" or "")."""

    stem: str
    image_path: str
    truth_path: str  # tissue label map, or lesion masks joined by ";" ("" = lesion-free)
    group: str = ""


_ACQUISITION = re.compile(r"_(DM|CM)_", re.IGNORECASE)


def acquisition_group(name: str, value: str = "") -> str:
    """"DM" / "CM" from an ``acquisition`` column value, else from a CDD-CESM name (``P1_L_DM_MLO``), else ""."""
    value = (value or "").strip().upper()
    if value in ("DM", "CM"):
        return value
    found = _ACQUISITION.search(Path(name).name)
    return found.group(1).upper() if found else ""


def _filter_split(df, split: str | None, source: str):
    if split is None:
        return df
    if "split" not in df.columns or not (df["split"] == split).any():
        raise ValueError(f"{source}: no rows with split == {split!r} (splits found: {sorted(set(df.get('split', [])))})")
    return df[df["split"] == split]


def tissue_cases(tissue_dir: str | None, tissue_csv: str | None, split: str | None) -> list[Case]:
    """Tissue ground truth from the DDSM folder layout or a workspace CSV (``datasets.read_tissue_table``)."""
    import datasets

    source = tissue_csv or tissue_dir
    if source is None:
        return []
    df = _filter_split(datasets.read_tissue_table(source), split if tissue_csv else None, str(source))
    return [Case(Path(r.image_file_path).stem, r.image_file_path, r.label_file_path) for r in df.itertuples()]


def lesion_cases(lesion_dir: str | None, lesion_csv: str | None, split: str | None) -> list[Case]:
    """Lesion ground truth from a workspace CSV (``datasets.read_lesion_table``) or an images/ + masks/ folder."""
    import datasets

    if lesion_csv:
        df = _filter_split(datasets.read_lesion_table(lesion_csv), split, lesion_csv)
        has_acq = "acquisition" in df.columns
        return [Case(Path(r["image_file_path"]).stem, r["image_file_path"], r["roi_mask_file_path"],
                     acquisition_group(r["image_file_path"], r["acquisition"] if has_acq else ""))
                for _, r in df.iterrows()]
    if not lesion_dir:
        return []
    root = Path(lesion_dir)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise FileNotFoundError(f"{root} is not a lesion folder: expected images/ and masks/ inside it "
                                "(or pass the workspace's unified_segmentation_dataset.csv with --lesion-csv)")
    masks = sorted(p for p in (root / "masks").iterdir() if p.is_file())
    cases = []
    for image in sorted(p for p in (root / "images").iterdir() if p.is_file() and not p.name.startswith(".")):
        own = [str(m) for m in masks if m.stem == image.stem or m.stem.startswith(image.stem + "_")]
        cases.append(Case(image.stem, str(image), ";".join(own), acquisition_group(image.name)))
    if not cases:
        raise FileNotFoundError(f"no images in {root / 'images'}")
    return cases


def read_lesion_truth(case: Case, shape: tuple[int, int]) -> np.ndarray:
    """Union of the case's lesion masks, ``(H, W)`` bool (all False for a lesion-free image)."""
    truth = np.zeros(shape, bool)
    for path in (p for p in case.truth_path.split(";") if p.strip()):
        mask = imaging.read_mask(path, kind="binary")
        if mask.shape != shape:
            raise ValueError(f"mask {path} is {mask.shape[0]}x{mask.shape[1]} but its image is {shape[0]}x{shape[1]}; "
                             "masks must match their image pixel for pixel")
        truth |= mask.astype(bool)
    return truth


# ------------------------------------------------------------------------------------------------ predictions
@dataclass
class LesionPrediction:
    prob: np.ndarray  # (H, W) float32 in [0, 1]
    roi_box: roi.RoiBox | None


class FolderPredictions:
    """Predictions written by ``cascade_inference.py``: ``<stem>_tissue_seg.png``, ``<stem>_cancer_prob.png`` (uint8
    p x 255 or uint16 p x 65535) and ``<stem>.json`` (its ``roi.box``).

    Files are looked up in the folder itself first, then anywhere below it (``cascade_inference.py --recursive``
    mirrors the input's sub-folders); a name found in several sub-folders is an error (ambiguous).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"predictions folder {self.folder} not found; run cascade_inference.py first")
        self._below: dict[str, list[Path]] | None = None

    def _find(self, name: str) -> Path | None:
        path = self.folder / name
        if path.is_file():
            return path
        if self._below is None:  # index the sub-folders once
            self._below = {}
            for root, _, files in os.walk(self.folder):
                for file in files:
                    self._below.setdefault(file, []).append(Path(root) / file)
        found = self._below.get(name, [])
        if len(found) > 1:
            raise ValueError(f"prediction {name} is ambiguous: found {[str(p) for p in found[:3]]}; evaluate each "
                             "sub-folder separately or give the images unique names")
        return found[0] if found else None

    def _file(self, case: Case, suffix: str) -> Path:
        path = self._find(f"{case.stem}{suffix}")
        if path is None:
            raise FileNotFoundError(f"prediction {case.stem}{suffix} not found in {self.folder} for image {case.image_path}")
        return path

    def tissue(self, case: Case, pixels: np.ndarray) -> np.ndarray:
        path = self._file(case, "_tissue_seg.png")
        classes = imaging.read_image(path).pixels
        if classes.max() >= NUM_TISSUE_CLASSES:
            raise ValueError(f"{path} holds values up to {classes.max()}; expected class indices 0..3 "
                             "(cascade_inference.py's *_tissue_seg.png, not the colour map)")
        return classes.astype(np.uint8)

    def lesion(self, case: Case, pixels: np.ndarray) -> LesionPrediction:
        raw = imaging.read_image(self._file(case, "_cancer_prob.png")).pixels
        prob = raw.astype(np.float32) / float(np.iinfo(raw.dtype).max)  # 8-bit: /255, 16-bit: /65535
        box = None
        report = self._find(f"{case.stem}.json")
        if report is not None:
            box = _roi_from_report(json.loads(report.read_text(encoding="utf-8")))
        return LesionPrediction(prob, box)


def _roi_from_report(report: dict) -> roi.RoiBox | None:
    """The ROI box of an inference report: ``roi_box`` as ``{y0, x0, y1, x1}`` or ``[y0, x0, y1, x1]``."""
    for key in ("roi_box", "roi"):
        value = report.get(key)
        if isinstance(value, dict) and {"y0", "x0", "y1", "x1"} <= set(value):
            return roi.RoiBox(*(int(value[k]) for k in ("y0", "x0", "y1", "x1")))
        if isinstance(value, dict) and isinstance(value.get("box"), (dict, list)):
            return _roi_from_report({"roi_box": value["box"]})
        if isinstance(value, (list, tuple)) and len(value) == 4:
            return roi.RoiBox(*(int(v) for v in value))
    return None


class CascadePredictions:
    """Predictions made here by :class:`cascade.Cascade` from the two checkpoints (either backend)."""

    def __init__(self, stage1_weights: str, stage2_weights: str | None, backend: str, device: str, tta: bool,
                 adaptive_clahe: str, channels_last: bool, threads: int | None):
        device = str(runners.resolve_device(device))
        runner1, checkpoint1 = runners.load_runner(stage1_weights, backend, device, channels_last=channels_last,
                                                   threads=threads)
        runner2, checkpoint2 = (None, None)
        if stage2_weights:
            runner2, checkpoint2 = runners.load_runner(stage2_weights, backend, device,
                                                       channels_last=channels_last, threads=threads)
        self.cascade = cascade.Cascade(checkpoint1, checkpoint2, stage1_runner=runner1, stage2_runner=runner2,
                                       tta=tta, adaptive_clahe=adaptive_clahe)
        self.seconds: list[float] = []

    def tissue(self, case: Case, pixels: np.ndarray) -> np.ndarray:
        start = time.perf_counter()
        found = self.cascade.tissue_and_roi(pixels)
        self.seconds.append(time.perf_counter() - start)
        return imaging.unflip(found.tissue_classes, found.flipped)

    def lesion(self, case: Case, pixels: np.ndarray) -> LesionPrediction:
        if self.cascade.stage2 is None:
            raise RuntimeError("lesion evaluation needs --stage2-weights (or --predictions-dir)")
        start = time.perf_counter()
        result = self.cascade(pixels)
        self.seconds.append(time.perf_counter() - start)
        return LesionPrediction(result.lesion_prob, result.roi_box)


# ------------------------------------------------------------------------------------------------ metrics
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
               match_iou: float, min_area_px: int = 1) -> dict:
    """Per-image lesion metrics: Dice / IoU of ``prob >= threshold``, counts, detection, ROI coverage.

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
    return row


def summarize_lesion(rows: list[dict]) -> dict:
    """Set-level lesion metrics of ``rows`` (see :data:`CONVENTIONS`)."""
    if not rows:
        return {"n_images": 0}
    with_lesion = [r for r in rows if r["has_lesion"]]
    sums = {k: sum(r[k] for r in rows) for k in ("intersection_pixels", "pred_pixels", "truth_pixels", "lesions",
                                                 "found", "detections", "false_positives")}
    covered = [r for r in with_lesion if not math.isnan(r["roi_coverage"])]

    def mean(key, items):
        return float(np.mean([r[key] for r in items])) if items else float("nan")

    return {
        "n_images": len(rows),
        "n_lesion_images": len(with_lesion),
        "dice_mean": mean("dice", rows),
        "iou_mean": mean("iou", rows),
        "dice_mean_lesion_images_only": mean("dice", with_lesion),
        "iou_mean_lesion_images_only": mean("iou", with_lesion),
        "dice_pooled": float(metrics.dice_from_counts(sums["intersection_pixels"], sums["pred_pixels"], sums["truth_pixels"])),
        "iou_pooled": float(metrics.iou_from_counts(sums["intersection_pixels"], sums["pred_pixels"], sums["truth_pixels"])),
        "lesions": sums["lesions"],
        "lesions_found": sums["found"],
        "sensitivity": sums["found"] / sums["lesions"] if sums["lesions"] else float("nan"),
        "false_positives": sums["false_positives"],
        "false_positives_per_image": sums["false_positives"] / len(rows),
        "roi_coverage_mean": mean("roi_coverage", covered),
        "roi_coverage_pooled": (sum(r["roi_truth_pixels_inside"] for r in covered) / sum(r["truth_pixels"] for r in covered)
                                if covered else float("nan")),
        "roi_coverage_images": len(covered),
    }


# ------------------------------------------------------------------------------------------------ plots
_TISSUE_COLOURS = np.array([[0, 0, 0], [255, 215, 0], [220, 20, 60], [30, 144, 255]], np.uint8)  # bg, adipose, FGT, pectoral


def _thumbnail(array: np.ndarray, max_side: int, nearest: bool) -> np.ndarray:
    import cv2

    scale = max_side / max(array.shape[:2])
    if scale >= 1:
        return array
    size = (max(1, round(array.shape[1] * scale)), max(1, round(array.shape[0] * scale)))
    if nearest:
        return cv2.resize(array.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return cv2.resize(array, size, interpolation=cv2.INTER_AREA)


@dataclass
class Thumb:
    """Small copies of one case for the worst-case panels."""

    stem: str
    score: float
    image: np.ndarray  # (h, w) uint8
    truth: np.ndarray  # (h, w) uint8 classes / 0-1
    pred: np.ndarray  # (h, w) uint8 classes / 0-1
    roi: tuple | None = None  # (y0, x0, y1, x1) in thumbnail pixels


def _keep_worst(thumbs: list[Thumb], n: int) -> None:
    if len(thumbs) > 2 * n:
        thumbs.sort(key=lambda t: t.score)
        del thumbs[n:]


def plot_dice_distribution(tissue_rows: list[dict], lesion_rows: list[dict], path: Path) -> Path:
    """Box plots with the per-image points (jittered) of the tissue per-class Dice and of the lesion Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    if tissue_rows:
        keys = [f"dice_{n}" for n in TISSUE_CLASS_NAMES] + ["macro_dice", "dice_4channel"]
        panels.append(("tissue Dice per image", [k.removeprefix("dice_") for k in keys],
                       [[r[k] for r in tissue_rows] for k in keys]))
    if lesion_rows:
        groups = sorted({r["group"] for r in lesion_rows if r["group"]})
        labels = ["all"] + groups
        data = [[r["dice"] for r in lesion_rows if r["has_lesion"] and (g == "all" or r["group"] == g)] for g in labels]
        panels.append(("lesion Dice per image (images with lesions)", labels, data))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    rng = np.random.default_rng(0)
    for ax, (title, labels, data) in zip(axes[0], panels):
        shown = [d if d else [np.nan] for d in data]
        ax.boxplot(shown, showfliers=False)
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=20)
        for i, values in enumerate(data, start=1):
            ax.scatter(i + rng.uniform(-0.15, 0.15, len(values)), values, s=8, alpha=0.6, color="tab:blue")
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_worst_cases(thumbs: list[Thumb], n: int, task: str, path: Path) -> Path:
    """Panels of the ``n`` worst cases: image, truth overlay, prediction overlay (tissue colours / lesion outlines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    worst = sorted(thumbs, key=lambda t: t.score)[:n]
    fig, axes = plt.subplots(len(worst), 3, figsize=(9, 3.2 * len(worst)), squeeze=False)
    for row, thumb in zip(axes, worst):
        gray = np.repeat(thumb.image[..., None], 3, axis=2).astype(np.float32)
        for ax, (title, mask) in zip(row, (("image", None), ("truth", thumb.truth), ("prediction", thumb.pred))):
            if mask is None:
                ax.imshow(thumb.image, cmap="gray")
            elif task == "tissue":
                ax.imshow((0.55 * gray + 0.45 * _TISSUE_COLOURS[mask]).astype(np.uint8))
            else:
                colour = "lime" if title == "truth" else "red"
                ax.imshow(thumb.image, cmap="gray")
                if mask.any():  # translucent fill (visible even when the whole image is predicted) + outline
                    ax.imshow(np.ma.masked_where(mask == 0, mask), cmap=ListedColormap([colour]), alpha=0.3,
                              interpolation="nearest")
                    ax.contour(mask, levels=[0.5], colors=colour, linewidths=1)
                if title == "prediction" and thumb.roi is not None:
                    y0, x0, y1, x1 = thumb.roi
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1))
            ax.set_title(f"{thumb.stem}\n{title}" + (f" (Dice {thumb.score:.3f})" if title == "prediction" else ""),
                         fontsize=8)
            ax.axis("off")
    if task == "tissue":
        fig.suptitle("worst tissue cases by macro Dice (yellow adipose, red FGT, blue pectoral)", fontsize=9)
    else:
        fig.suptitle("worst lesion cases by Dice (green truth, red prediction, yellow ROI box)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight()))  # keep a strip for the title
    return _save_figure(fig, path)


def _save_figure(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return fileio.atomic_write_bytes(path, buffer.getvalue())


# ------------------------------------------------------------------------------------------------ output files
# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_tissue(cases: list[Case], predictor, worst_n: int, thumb_side: int, skipped: list, progress=None):
    """Tissue metrics over ``cases``: ``(rows, confusion (4, 4), thumbnails of the worst cases)``; bad items are
    appended to ``skipped`` and the rest goes on."""
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
        rows.append({"task": "tissue", "stem": case.stem, "group": case.group, "image_file_path": case.image_path, **row})
        thumbs.append(Thumb(case.stem, row["macro_dice"], _thumbnail(imaging.scale_to_uint8(pixels), thumb_side, False),
                            _thumbnail(truth, thumb_side, True), _thumbnail(pred, thumb_side, True)))
        _keep_worst(thumbs, worst_n)
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
            row = lesion_row(predicted.prob, truth, predicted.roi_box, threshold, match_iou, min_area_px)
        except (OSError, ValueError, RuntimeError, imaging.ImageReadError) as error:
            skipped.append({"task": "lesion", "image": case.image_path, "reason": f"{type(error).__name__}: {error}"})
            continue
        rows.append({"task": "lesion", "stem": case.stem, "group": case.group, "image_file_path": case.image_path, **row})
        if row["has_lesion"] or row["pred_pixels"]:
            scale = min(1.0, thumb_side / max(pixels.shape))
            box = predicted.roi_box
            roi = None if box is None else tuple(round(v * scale) for v in (box.y0, box.x0, box.y1, box.x1))
            thumbs.append(Thumb(case.stem, row["dice"], _thumbnail(imaging.scale_to_uint8(pixels), thumb_side, False),
                                _thumbnail(truth.astype(np.uint8), thumb_side, True),
                                _thumbnail((predicted.prob >= threshold).astype(np.uint8), thumb_side, True), roi))
            _keep_worst(thumbs, worst_n)
    return rows, thumbs


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the evaluation (see the module docstring)."""
    parser = argparse.ArgumentParser(description="Evaluate the cascade against tissue and lesion ground truth.",
                                     add_help=add_help, parents=[cli.runtime_parser("backend", "device", "threads", "tta")])
    parser.set_defaults(device="cpu")  # evaluation is reproducible on any machine unless a GPU is asked for
    # ground truth
    parser.add_argument("--tissue-dir", type=str, default=None,
                        help="DDSM tissue-label folder (fgt_seg/ + fgt_seg_labels/) (default: %(default)s)")
    parser.add_argument("--tissue-csv", type=str, default=None, help="workspace tissue_dataset.csv (default: %(default)s)")
    parser.add_argument("--lesion-csv", type=str, default=None,
                        help="workspace unified_segmentation_dataset.csv (default: %(default)s)")
    parser.add_argument("--lesion-dir", type=str, default=None,
                        help="lesion folder with images/ and masks/ (masks/<stem>.* or <stem>_*.*; no mask = "
                             "lesion-free) (default: %(default)s)")
    parser.add_argument("--split", type=str, default=None,
                        help="keep only this split of a CSV: train, val or test (default: all rows)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate at most this many images per task")
    # predictions
    parser.add_argument("--predictions-dir", type=str, default=None,
                        help="outputs of cascade_inference.py (<stem>_tissue_seg.png, <stem>_cancer_prob.png, <stem>.json)")
    parser.add_argument("--stage1-weights", type=str, default=None,
                        help="stage-1 checkpoint (.pth, or .onnx with --backend onnxruntime): run the cascade here")
    parser.add_argument("--stage2-weights", type=str, default=None, help="stage-2 checkpoint (.pth or .onnx)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format (torch backend)")
    parser.add_argument("--adaptive-clahe", choices=("off", "on", "auto"), default="off",
                        help="stronger CLAHE for low-contrast images (default: %(default)s)")
    parser.add_argument("--export-onnx", type=str, default=None, metavar="DIR",
                        help="also export the given checkpoints to DIR/stage1.onnx and DIR/stage2.onnx")
    # metric settings
    parser.add_argument("--threshold", type=float, default=LESION_THRESHOLD,
                        help="lesion probability threshold (default: %(default)s)")
    parser.add_argument("--match-iou", type=float, default=metrics.LESION_MATCH_IOU,
                        help="IoU a predicted component needs with a lesion to detect it (default: %(default)s)")
    parser.add_argument("--min-lesion-area", type=int, default=MIN_LESION_AREA_PX,
                        help="true and predicted components under this many pixels are ignored in detection counts "
                             "(JPEG specks in thresholded masks); Dice and IoU use every pixel (default: %(default)s)")
    # outputs
    parser.add_argument("--output-dir", type=str, default=None, help="folder for metrics.json, per_image.csv, plots/")
    parser.add_argument("--worst-n", type=int, default=6, help="worst cases shown per task (default: %(default)s)")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="skip the plots")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs in --output-dir")
    return parser


def main(args: argparse.Namespace) -> int:
    """Evaluate as the command line asks; returns 0 (done; skipped items listed), 1 (nothing evaluated) or 2 (usage)."""
    import pandas as pd

    if args.export_onnx:
        import onnx_export

        if not (args.stage1_weights or args.stage2_weights):
            return cli.usage_error("--export-onnx needs --stage1-weights and/or --stage2-weights")
        try:
            report = onnx_export.export_stages(args.stage1_weights, args.stage2_weights, args.export_onnx,
                                               overwrite=args.overwrite)
        except (FileNotFoundError, FileExistsError, ValueError) as error:
            return cli.usage_error(str(error))
        for name, item in report.items():
            print(f"exported {name}: {item['path']} (max |logit diff| vs PyTorch {item['max_abs_logit_diff']:.2e})")
        if not any((args.tissue_dir, args.tissue_csv, args.lesion_dir, args.lesion_csv)):
            return 0

    if args.tissue_dir and args.tissue_csv:
        return cli.usage_error("give --tissue-dir or --tissue-csv, not both")
    if args.lesion_dir and args.lesion_csv:
        return cli.usage_error("give --lesion-dir or --lesion-csv, not both")
    if not any((args.tissue_dir, args.tissue_csv, args.lesion_dir, args.lesion_csv)):
        return cli.usage_error("no ground truth: pass --tissue-dir/--tissue-csv and/or --lesion-dir/--lesion-csv")
    if bool(args.predictions_dir) == bool(args.stage1_weights):
        return cli.usage_error("pass either --predictions-dir or --stage1-weights (+ --stage2-weights), exactly one")
    if args.output_dir is None:
        return cli.usage_error("--output-dir is required")
    if not 0 < args.threshold < 1 or not 0 < args.match_iou <= 1:
        return cli.usage_error("--threshold must be in (0, 1) and --match-iou in (0, 1]")
    out = Path(args.output_dir)
    existing = [p for p in (out / "metrics.json", out / "per_image.csv") if p.exists()]
    if existing and not args.overwrite:
        return cli.usage_error(f"{existing[0]} exists; pass --overwrite or choose another --output-dir")

    if args.split and (args.tissue_dir or args.lesion_dir):
        print(f"note: --split {args.split} applies to CSV ground truth only; folders (--tissue-dir / --lesion-dir) "
              "are evaluated whole", file=sys.stderr)
    try:
        tissue = tissue_cases(args.tissue_dir, args.tissue_csv, args.split)
        lesion = lesion_cases(args.lesion_dir, args.lesion_csv, args.split)
    except (FileNotFoundError, ValueError) as error:
        return cli.usage_error(str(error))
    if args.limit is not None:
        tissue, lesion = tissue[: args.limit], lesion[: args.limit]
    try:
        if args.predictions_dir:
            predictor = FolderPredictions(args.predictions_dir)
        else:
            if lesion and not args.stage2_weights:
                return cli.usage_error("lesion ground truth given: pass --stage2-weights too (or --predictions-dir)")
            predictor = CascadePredictions(args.stage1_weights, args.stage2_weights, args.backend, args.device,
                                           args.tta, args.adaptive_clahe, args.channels_last, args.threads)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        return cli.usage_error(str(error))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        from tqdm import tqdm

        def progress(items):
            return tqdm(items, desc="evaluating", unit="image", file=sys.stderr, disable=None)
    except ImportError:  # pragma: no cover - tqdm is a requirement
        progress = None

    skipped: list[dict] = []
    tissue_rows, confusion, tissue_thumbs = evaluate_tissue(tissue, predictor, args.worst_n, 384, skipped, progress)
    lesion_rows, lesion_thumbs = evaluate_lesion(lesion, predictor, args.threshold, args.match_iou,
                                                 args.min_lesion_area, args.worst_n, 384,
                                                 skipped, progress)
    for item in skipped:
        print(f"skipped {item['task']} {item['image']}: {item['reason']}", file=sys.stderr)

    summary = {
        "evaluation": {
            "mode": "predictions_dir" if args.predictions_dir else "cascade",
            "predictions_dir": args.predictions_dir, "stage1_weights": args.stage1_weights,
            "stage2_weights": args.stage2_weights, "backend": None if args.predictions_dir else args.backend,
            "tta": args.tta, "adaptive_clahe": args.adaptive_clahe,
            "ground_truth": {"tissue": args.tissue_dir or args.tissue_csv, "lesion": args.lesion_dir or args.lesion_csv,
                             "split": args.split},
            "lesion_threshold": args.threshold, "match_iou": args.match_iou, "min_lesion_area_px": args.min_lesion_area,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "conventions": {**CONVENTIONS, "lesion_threshold_value": args.threshold, "match_iou_value": args.match_iou,
                        "min_lesion_area_px_value": args.min_lesion_area},
        "skipped": skipped,
    }
    if isinstance(predictor, CascadePredictions) and predictor.seconds:
        summary["evaluation"]["seconds_per_image_mean"] = float(np.mean(predictor.seconds))
    if tissue:
        summary["tissue"] = summarize_tissue(tissue_rows, confusion)
    if lesion:
        groups = sorted({r["group"] for r in lesion_rows if r["group"]})
        summary["lesion"] = {"all": summarize_lesion(lesion_rows),
                             **{g: summarize_lesion([r for r in lesion_rows if r["group"] == g]) for g in groups}}

    rows = tissue_rows + lesion_rows
    out.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(out / "per_image.csv", pd.DataFrame(rows).to_csv(index=False) if rows else "task,stem\n")
    if args.plots and rows:
        plots = out / "plots"
        plot_dice_distribution(tissue_rows, lesion_rows, plots / "dice_distribution.png")
        if tissue_thumbs:
            plot_worst_cases(tissue_thumbs, args.worst_n, "tissue", plots / "worst_tissue.png")
        if lesion_thumbs:
            plot_worst_cases(lesion_thumbs, args.worst_n, "lesion", plots / "worst_lesion.png")
    fileio.atomic_write_text(out / "metrics.json", json.dumps(fileio.json_safe(summary), indent=2) + "\n")
    _print_summary(summary)
    if not rows:
        print("error: no image could be evaluated (see the skipped items above)", file=sys.stderr)
        return 1
    return 0


def _print_summary(summary: dict) -> None:
    tissue = summary.get("tissue")
    if tissue and tissue.get("n_images"):
        mean, pooled = tissue["mean"], tissue["pooled"]
        print(f"tissue ({tissue['n_images']} images): 4-channel Dice {mean['dice_4channel']:.4f} "
              f"(pooled {pooled['dice_4channel']:.4f}), macro Dice {mean['macro_dice']:.4f}, "
              f"pixel accuracy {mean['pixel_accuracy']:.4f}")
        print("  per-class Dice: " + ", ".join(f"{n} {mean['dice_' + n]:.4f}" for n in TISSUE_CLASS_NAMES))
    for group, item in summary.get("lesion", {}).items():
        if item.get("n_images"):
            print(f"lesion [{group}] ({item['n_images']} images, {item['lesions']} lesions): Dice {item['dice_mean']:.4f} "
                  f"(pooled {item['dice_pooled']:.4f}), sensitivity {item['sensitivity']:.3f}, "
                  f"FP/image {item['false_positives_per_image']:.2f}, ROI coverage {item['roi_coverage_pooled']:.3f}")
    if summary["skipped"]:
        print(f"{len(summary['skipped'])} item(s) skipped (listed in metrics.json)")


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
