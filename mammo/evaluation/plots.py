"""Figures of the evaluation: the per-image Dice distributions and the worst cases with their overlays.

What lives here (the numbers are ``scores.py``, the command line ``evaluate.py``): :class:`Thumb` and
:func:`case_thumb` (small copies of one case, kept while scoring so no image is read twice), :func:`keep_worst`,
:func:`plot_dice_distribution` (``plots/dice_distribution.png``), :func:`plot_density_scatter`
(``plots/density_scatter.png``) and :func:`plot_worst_cases`
(``plots/worst_tissue.png``, ``plots/worst_lesion.png``). Figures are written atomically (``fileio``) with
matplotlib's Agg backend, imported only when a figure is drawn.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammo.core import fileio
from mammo import imaging
from mammo.imaging import roi
from mammo.core.labels import TISSUE_CLASS_NAMES

# background, adipose, FGT, pectoral
_TISSUE_COLOURS = np.array([[0, 0, 0], [255, 215, 0], [220, 20, 60], [30, 144, 255]], np.uint8)


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


def case_thumb(stem: str, score: float, pixels: np.ndarray, truth: np.ndarray, pred: np.ndarray, max_side: int,
               roi_box: roi.RoiBox | None = None) -> Thumb:
    """Small copies of one case: the image scaled to uint8, truth and prediction (nearest neighbour), all at most
    ``max_side`` pixels on their long side; ``roi_box`` (full-resolution pixels) scaled to the thumbnail.

    Args:
        pixels: the image ``(H, W)`` as read (any integer or float type).
        truth, pred: ``(H, W)`` class indices (tissue) or 0/1 (lesion), at the image's size.
    """
    scale = min(1.0, max_side / max(pixels.shape))
    box = None if roi_box is None else tuple(round(v * scale) for v in (roi_box.y0, roi_box.x0, roi_box.y1, roi_box.x1))
    return Thumb(stem, score, _thumbnail(imaging.scale_to_uint8(pixels), max_side, False),
                 _thumbnail(truth, max_side, True), _thumbnail(pred, max_side, True), box)


def keep_worst(thumbs: list[Thumb], n: int) -> None:
    """Trim ``thumbs`` in place to the ``n`` lowest scores once it holds more than ``2 n`` (bounded memory)."""
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

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return fileio.atomic_write_bytes(path, buffer.getvalue())


def plot_density_scatter(density_rows: list[dict], path: Path) -> Path:
    """Predicted vs mask percent density per image (``scores.density_row`` rows), the model and the Otsu baseline,
    with the identity line; axes in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    top = 100.0
    for key, label, colour in (("percent_density_pred", "model", "tab:blue"),
                               ("otsu_percent_density_pred", "Otsu baseline", "tab:orange")):
        pairs = [(r["percent_density_mask"], r[key]) for r in density_rows
                 if np.isfinite(r["percent_density_mask"]) and np.isfinite(r[key])]
        if pairs:
            x, y = np.array(pairs).T
            ax.scatter(x, y, s=14, alpha=0.7, color=colour, label=label)
            top = max(top, float(x.max()), float(y.max()))
    ax.plot([0, top], [0, top], color="gray", linewidth=1, linestyle="--")
    ax.set_xlabel("mask density (% of predicted breast)")
    ax.set_ylabel("predicted density (%)")
    ax.set_title("percent density per image")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)
