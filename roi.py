"""The stage-2 region of interest (ROI): a box grown from stage 1's FGT, and pasting values back into a full image.

The cascade (``cascade.py``), stage-2 training crops (``roi_crops.py``) and the per-image record all take the ROI
from :func:`fgt_roi_box`, so training and inference crop the same way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from labels import BACKGROUND, FGT

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

    def to_dict(self) -> dict:
        return asdict(self)


def _bounding_box(mask: np.ndarray) -> RoiBox | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return RoiBox(int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)


def fgt_roi_box(tissue_classes: np.ndarray, margin_fraction: float = ROI_MARGIN_FRACTION,
                min_side: int = ROI_MIN_SIDE) -> tuple[RoiBox, str]:
    """The stage-2 region of interest: the bounding box of the FGT, grown by a margin, clipped to the image.

    Args:
        tissue_classes: ``(H, W)`` integer class map (0 background, 1 adipose, 2 FGT, 3 pectoral).
        margin_fraction: margin on each side as a fraction of the box's own height / width (default 0.10).
        min_side: each side is grown (about the centre) to at least this many pixels, image size permitting.

    Returns:
        ``(box, source)``: ``source`` is ``"fgt"`` normally, ``"breast"`` when no FGT pixel exists (box around
        adipose + FGT + pectoral) and ``"image"`` when the map has no tissue at all (the whole image).
    """
    height, width = tissue_classes.shape[:2]
    box, source = _bounding_box(tissue_classes == FGT), "fgt"
    if box is None:
        box, source = _bounding_box(tissue_classes != BACKGROUND), "breast"
    if box is None:
        return RoiBox(0, 0, height, width), "image"
    dy, dx = int(round(box.height * margin_fraction)), int(round(box.width * margin_fraction))
    y0, y1 = _grow(box.y0 - dy, box.y1 + dy, min_side, height)
    x0, x1 = _grow(box.x0 - dx, box.x1 + dx, min_side, width)
    return RoiBox(y0, x0, y1, x1), source


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
