"""The stage-2 region of interest (ROI): a box grown from stage 1's FGT, and pasting values back into a full image.

The cascade (:mod:`mammo.cascade.pipeline`), stage-2 training crops (:mod:`mammo.training.roi_crops`) and the
per-image record all take the ROI from :func:`fgt_roi_box`, so training and inference crop the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from mammo.core.labels import BACKGROUND, FGT

#: Margin added on each side of the FGT bounding box, as a fraction of the box's height / width. Our choice: lesions
#: at the FGT border (often in the subcutaneous fat just outside it) stay inside the crop; 10 % keeps the crop small.
ROI_MARGIN_FRACTION = 0.10

#: Smallest ROI side in original pixels; a tiny FGT island is grown to this so stage 2 sees some context.
ROI_MIN_SIDE = 64


@dataclass(frozen=True)
class RoiBox:
    """A half-open pixel box ``[y0, y1) x [x0, x1)`` in an image's pixel coordinates."""

    y0: int
    x0: int
    y1: int
    x1: int

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def mirrored(self, image_width: int) -> "RoiBox":
        """The same box after mirroring an image of ``image_width`` pixels left-right."""
        return RoiBox(self.y0, image_width - self.x1, self.y1, image_width - self.x0)

    def scaled(self, from_hw: tuple[int, int], to_hw: tuple[int, int]) -> "RoiBox":
        """The same region in an image resized from ``from_hw`` to ``to_hw`` (pixels): the smallest box of the new
        grid that covers it (start rounded down, end rounded up), clipped to the image, at least 1 px a side."""
        fy, fx = to_hw[0] / from_hw[0], to_hw[1] / from_hw[1]
        y0, x0 = min(int(np.floor(self.y0 * fy)), to_hw[0] - 1), min(int(np.floor(self.x0 * fx)), to_hw[1] - 1)
        y1 = min(max(int(np.ceil(self.y1 * fy)), y0 + 1), to_hw[0])
        x1 = min(max(int(np.ceil(self.x1 * fx)), x0 + 1), to_hw[1])
        return RoiBox(y0, x0, y1, x1)

    def to_dict(self) -> dict:
        return asdict(self)


def _bounding_box(mask: np.ndarray) -> RoiBox | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return RoiBox(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


@dataclass(frozen=True)
class RoiRule:
    """How the ROI box is grown from stage 1's tissue map (stored in every stage-2 checkpoint under ``roi``).

    Attributes:
        margin_fraction: margin on each side as a fraction of the FGT box's own height / width.
        breast_margin_fraction: at least this margin on each side as a fraction of the *breast's* bounding box
            height / width (the breast = every non-background pixel). A margin tied to the breast's size rather than
            to the FGT box: a small FGT box still gets room around it, and the rule needs no pixel spacing (the
            CDD-CESM and VinDr copies are resized and carry none). 0 turns it off.
        min_fgt_fraction: FGT connected components smaller than this fraction of the breast's area are left out of
            the box (isolated specks that would stretch it), unless that leaves no FGT. 0 keeps every pixel.
        clip_to_breast: clip the grown box to the breast's bounding box (margins never reach into the background
            beyond the breast; the lesions a box must hold lie in the breast).
        min_side: each side is grown (about the centre) to at least this many pixels, image size permitting.

    The defaults reproduce the suite's first rule (10 % of the FGT box, nothing else), so stage-2 checkpoints that
    predate this class keep their boxes; ``from_dict`` reads what such checkpoints stored.
    """

    margin_fraction: float = ROI_MARGIN_FRACTION
    breast_margin_fraction: float = 0.0
    min_fgt_fraction: float = 0.0
    clip_to_breast: bool = False
    min_side: int = ROI_MIN_SIDE

    def __post_init__(self) -> None:
        for name in ("margin_fraction", "breast_margin_fraction", "min_fgt_fraction"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ValueError(f"ROI rule: {name} must be in [0, 1), got {value}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, settings: dict | None) -> "RoiRule":
        """The rule of a checkpoint's ``roi`` dict (unknown keys ignored, missing ones at their defaults)."""
        settings = settings or {}
        known = {k: settings[k] for k in ("margin_fraction", "breast_margin_fraction", "min_fgt_fraction",
                                          "clip_to_breast", "min_side") if k in settings}
        return cls(**known)


def fgt_roi_box(tissue_classes: np.ndarray, margin_fraction: float = ROI_MARGIN_FRACTION,
                min_side: int = ROI_MIN_SIDE, rule: RoiRule | None = None) -> tuple[RoiBox, str]:
    """The stage-2 region of interest: the bounding box of the FGT, grown by a margin, clipped to the image.

    Args:
        tissue_classes: ``(H, W)`` integer class map (0 background, 1 adipose, 2 FGT, 3 pectoral).
        margin_fraction: margin on each side as a fraction of the box's own height / width (default 0.10); used
            when ``rule`` is None.
        min_side: each side is grown (about the centre) to at least this many pixels, image size permitting; used
            when ``rule`` is None.
        rule: the whole :class:`RoiRule` (overrides the two arguments above).

    Returns:
        ``(box, source)``: ``source`` is ``"fgt"`` normally, ``"breast"`` when no FGT pixel exists (box around
        adipose + FGT + pectoral) and ``"image"`` when the map has no tissue at all (the whole image).
    """
    if rule is None:
        rule = RoiRule(margin_fraction=margin_fraction, min_side=min_side)
    height, width = tissue_classes.shape[:2]
    fgt = tissue_classes == FGT
    breast_box = None
    if rule.breast_margin_fraction > 0 or rule.min_fgt_fraction > 0 or rule.clip_to_breast:
        breast = tissue_classes != BACKGROUND
        breast_box = _bounding_box(breast)
        if rule.min_fgt_fraction > 0 and fgt.any():
            fgt = _without_small_components(fgt, rule.min_fgt_fraction * float(breast.sum()))
    box, source = _bounding_box(fgt), "fgt"
    if box is None:
        box, source = _bounding_box(tissue_classes != BACKGROUND), "breast"
    if box is None:
        return RoiBox(0, 0, height, width), "image"
    dy, dx = int(round(box.height * rule.margin_fraction)), int(round(box.width * rule.margin_fraction))
    if breast_box is not None and source == "fgt":
        dy = max(dy, int(round(breast_box.height * rule.breast_margin_fraction)))
        dx = max(dx, int(round(breast_box.width * rule.breast_margin_fraction)))
    y0, y1, x0, x1 = box.y0 - dy, box.y1 + dy, box.x0 - dx, box.x1 + dx
    if rule.clip_to_breast and breast_box is not None:
        y0, y1 = max(y0, breast_box.y0), min(y1, breast_box.y1)
        x0, x1 = max(x0, breast_box.x0), min(x1, breast_box.x1)
    y0, y1 = _grow(y0, y1, rule.min_side, height)
    x0, x1 = _grow(x0, x1, rule.min_side, width)
    return RoiBox(y0, x0, y1, x1), source


def _without_small_components(mask: np.ndarray, min_area: float) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_area`` pixels (unchanged if none is left)."""
    count, components, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= min_area) + 1
    if keep.size == 0 or keep.size == count - 1:
        return mask
    return np.isin(components, keep)


def _grow(start: int, stop: int, min_side: int, limit: int) -> tuple[int, int]:
    start, stop = max(start, 0), min(stop, limit)
    missing = min(min_side, limit) - (stop - start)
    if missing > 0:
        start = max(0, start - missing // 2)
        stop = min(limit, start + min(min_side, limit))
        start = max(0, stop - min(min_side, limit))
    return start, stop


def paste_into_box(values: np.ndarray, box: RoiBox, shape_hw: tuple[int, int]) -> np.ndarray:
    """A float32 ``(H, W)`` array of zeros with ``values`` ``(box.height, box.width)`` placed at ``box``."""
    if values.shape[:2] != (box.height, box.width):
        raise ValueError(f"values of shape {values.shape} do not fit the ROI box {box.height}x{box.width}")
    full = np.zeros(shape_hw, dtype=np.float32)
    full[box.slices()] = values
    return full
