"""Letterbox geometry: network sizes (multiples of 32), the aspect-preserving resize into the network input and
its exact inverse (crop + resize); masks use pixel-centre nearest neighbour."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


#: Network input sides must be multiples of this (five 2x down-samplings in the U-Net encoders).
SIZE_MULTIPLE = 32


def network_size(value: int | str | tuple | list) -> tuple[int, int]:
    """Parse a network input size: one int (square) or two (height, width); both multiples of 32.

    Args:
        value: ``512``, ``"512"``, ``"1024,512"``, ``"1024x512"``, ``(1024, 512)`` or ``[1024, 512]``.

    Returns:
        ``(h, w)`` in pixels.

    Raises:
        ValueError: unparsable, not positive, or not a multiple of 32 (the message names the nearest valid size).
    """
    if isinstance(value, str):
        parts = [p for p in value.replace("x", ",").replace("X", ",").replace(" ", ",").split(",") if p]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = [value]
    try:
        nums = [int(p) for p in parts]
        if any(float(p) != n for p, n in zip(parts, nums)):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"network size must be one int (square) or two ints (height, width), got {value!r}") \
            from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise ValueError(f"network size must be one int (square) or two ints (height, width), got {value!r}")
    h, w = nums
    if h <= 0 or w <= 0 or h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        def nearest(n: int) -> int:
            return max(SIZE_MULTIPLE, int(round(n / SIZE_MULTIPLE)) * SIZE_MULTIPLE)
        raise ValueError(f"network size {h}x{w} (HxW): both sides must be positive multiples of {SIZE_MULTIPLE} "
                         f"(the encoders down-sample 5 times); nearest valid size: {nearest(h)}x{nearest(w)}")
    return h, w


@dataclass(frozen=True)
class LetterboxGeometry:
    """Where an image went in a letterboxed network input.

    The original ``(orig_h, orig_w)`` image is resized (aspect ratio kept) to ``(resized_h, resized_w)``,
    placed at the top-left corner of the ``(net_h, net_w)`` network input, and the bottom / right remainder is
    zero padding. The inverse is a crop of the top-left ``(resized_h, resized_w)`` followed by a resize to the
    original size. All values in pixels.
    """

    orig_h: int
    orig_w: int
    net_h: int
    net_w: int
    resized_h: int
    resized_w: int

    @property
    def scale(self) -> float:
        """Uniform scale factor (network pixels per original pixel) used to compute the resized size."""
        return min(self.net_h / self.orig_h, self.net_w / self.orig_w)

    def to_dict(self) -> dict[str, int]:
        """Flat dict of ints (JSON-serialisable; collates into tensors in a DataLoader batch)."""
        return {"orig_h": self.orig_h, "orig_w": self.orig_w, "net_h": self.net_h, "net_w": self.net_w,
                "resized_h": self.resized_h, "resized_w": self.resized_w}

    @classmethod
    def from_dict(cls, d: dict) -> "LetterboxGeometry":
        """Inverse of :meth:`to_dict`; accepts ints, 0-d tensors or numpy scalars as values."""
        keys = ("orig_h", "orig_w", "net_h", "net_w", "resized_h", "resized_w")
        missing = [k for k in keys if k not in d]
        if missing:
            raise KeyError(f"letterbox geometry dict lacks {missing}; got keys {sorted(d)}")
        return cls(**{k: int(d[k]) for k in keys})


def letterbox_geometry(orig_hw: tuple[int, int], size_hw: tuple[int, int] | int) -> LetterboxGeometry:
    """Geometry of :func:`letterbox` for an ``orig_hw`` image and a network size (see :func:`network_size`)."""
    net_h, net_w = network_size(size_hw)
    h, w = int(orig_hw[0]), int(orig_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    scale = min(net_h / h, net_w / w)
    rh = min(net_h, max(1, int(round(h * scale))))
    rw = min(net_w, max(1, int(round(w * scale))))
    return LetterboxGeometry(h, w, net_h, net_w, rh, rw)


def _nearest_indices(src: int, dst: int) -> np.ndarray:
    """Pixel-centre nearest-neighbour source index for each destination index (as OpenCV INTER_NEAREST_EXACT).

    ``src_index = floor((dst_index + 0.5) * src / dst)``. With this rule an upscale followed by the
    downscale back to the original size is exactly the identity.
    """
    idx = ((np.arange(dst, dtype=np.float64) + 0.5) * (src / dst)).astype(np.int64)
    return np.minimum(idx, src - 1)


_INTERPOLATIONS = ("linear", "nearest", "area")


def _resize(array: np.ndarray, out_hw: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize the last two axes of ``array`` to ``out_hw``."""
    if interpolation not in _INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
    h, w = array.shape[-2:]
    oh, ow = out_hw
    if (h, w) == (oh, ow):
        return array.copy()
    if interpolation == "nearest":
        rows, cols = _nearest_indices(h, oh), _nearest_indices(w, ow)
        return array[..., rows[:, None], cols[None, :]]
    if array.dtype not in (np.uint8, np.uint16, np.float32, np.float64, np.int16):
        raise TypeError(f"{interpolation} resizing needs uint8/uint16/int16/float32/float64 data, got {array.dtype};"
                        " use interpolation='nearest' for label maps")
    # INTER_AREA when shrinking (anti-aliasing), INTER_LINEAR when enlarging; "area" forces INTER_AREA.
    shrinking = oh * ow < h * w
    flag = cv2.INTER_AREA if (interpolation == "area" or shrinking) else cv2.INTER_LINEAR
    if array.ndim == 2:
        return cv2.resize(array, (ow, oh), interpolation=flag)
    flat = array.reshape((-1, h, w))
    out = np.stack([cv2.resize(np.ascontiguousarray(c), (ow, oh), interpolation=flag) for c in flat])
    return out.reshape(array.shape[:-2] + (oh, ow))


def resize(array: np.ndarray, out_hw: tuple[int, int], interpolation: str) -> np.ndarray:
    """Resize the last two axes of ``array`` to ``out_hw`` (pixels): ``"nearest"`` (pixel-centre rule, any dtype:
    label maps and masks), ``"linear"`` (INTER_AREA when shrinking, INTER_LINEAR when enlarging) or ``"area"``.

    Raises:
        ValueError: an unknown interpolation. TypeError: linear / area resizing of an unsupported dtype.
    """
    return _resize(array, tuple(int(v) for v in out_hw), interpolation)


#: Limits of the working-scale factor (working size / input size): a breast is never enlarged more than 8 times or
#: shrunk below 1/16 (a thumbnail or a 1-pixel image is not blown up to the working size). Ours.
WORKING_SCALE_LIMITS = (1.0 / 16.0, 8.0)


def working_size(shape_hw: tuple[int, int], breast_height_px: int, target_breast_height_px: int) -> tuple[int, int]:
    """The image size at which the breast is ``target_breast_height_px`` high: ``shape_hw`` scaled by
    ``target / breast_height_px`` (clipped to :data:`WORKING_SCALE_LIMITS`), aspect kept, each side >= 1 px.
    The input size itself when the target is 0 (off) or no breast was found."""
    h, w = (int(v) for v in shape_hw)
    if target_breast_height_px <= 0 or breast_height_px <= 0:
        return h, w
    low, high = WORKING_SCALE_LIMITS
    factor = min(max(target_breast_height_px / breast_height_px, low), high)
    return max(1, int(round(h * factor))), max(1, int(round(w * factor)))


def letterbox(image: np.ndarray, size_hw: tuple[int, int] | int,
              interpolation: str = "linear") -> tuple[np.ndarray, LetterboxGeometry]:
    """Aspect-preserving resize of an image or mask into a network-size canvas (zero padding bottom / right).

    The scale is ``min(net_h / H, net_w / W)``; the resized image (sides rounded to whole pixels) sits at the
    top-left corner so that the inverse (:func:`unletterbox`) is a plain crop + resize.

    Args:
        image: ``(H, W)`` or ``(C, H, W)`` array (uint8 / uint16 / float; any integer type with "nearest").
        size_hw: network size ``(h, w)`` (multiples of 32) or one int for a square.
        interpolation: "linear" for images (OpenCV INTER_LINEAR when enlarging, INTER_AREA when shrinking),
            "area", or "nearest" for masks and label maps (pixel-centre nearest neighbour; values are only
            copied, never mixed, so binary / integer masks stay binary / integer-valued).

    Returns:
        ``(out, geometry)``: ``out`` of shape ``(net_h, net_w)`` or ``(C, net_h, net_w)`` and the input's dtype,
        and the :class:`LetterboxGeometry` to undo it.

    Raises:
        ValueError: bad size (see :func:`network_size`), shape or interpolation. TypeError: dtype unsupported by
            the interpolation.
    """
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(f"letterbox expects (H, W) or (C, H, W), got shape {arr.shape}")
    geom = letterbox_geometry(arr.shape[-2:], size_hw)
    resized = _resize(arr, (geom.resized_h, geom.resized_w), interpolation)
    out = np.zeros(arr.shape[:-2] + (geom.net_h, geom.net_w), dtype=arr.dtype)
    out[..., : geom.resized_h, : geom.resized_w] = resized
    return out, geom


def unletterbox(array: np.ndarray, geometry: LetterboxGeometry | dict,
                interpolation: str = "linear") -> np.ndarray:
    """Map a network-size output back onto the original image's pixel grid (inverse of :func:`letterbox`).

    Args:
        array: ``(net_h, net_w)`` or ``(C, net_h, net_w)`` array (probabilities: float, "linear"; class or binary
            masks: any integer dtype, "nearest"). A torch tensor is converted with ``.numpy()`` on the CPU.
        geometry: the :class:`LetterboxGeometry` returned by :func:`letterbox` (or its ``to_dict()``).
        interpolation: "linear", "area" or "nearest" (see :func:`letterbox`).

    Returns:
        ``(orig_h, orig_w)`` or ``(C, orig_h, orig_w)`` array of the input's dtype.

    Guarantees (tested on real masks): with "nearest", when the network size is at least the image size (the
    letterbox enlarges) ``unletterbox(letterbox(m)) == m`` exactly; when it shrinks by a factor f, every pixel
    that differs takes a value found within ``ceil(f / 2)`` pixels of it in the original (only pixels next
    to a class boundary can change).

    Raises:
        ValueError: the array's last two axes do not match the geometry's network size.
    """
    geom = geometry if isinstance(geometry, LetterboxGeometry) else LetterboxGeometry.from_dict(geometry)
    arr = array.detach().cpu().numpy() if hasattr(array, "detach") else np.asarray(array)
    if arr.ndim not in (2, 3) or arr.shape[-2:] != (geom.net_h, geom.net_w):
        raise ValueError(f"unletterbox: expected (..., {geom.net_h}, {geom.net_w}) for this geometry, "
                         f"got shape {arr.shape}")
    crop = arr[..., : geom.resized_h, : geom.resized_w]
    return _resize(np.ascontiguousarray(crop), (geom.orig_h, geom.orig_w), interpolation)
