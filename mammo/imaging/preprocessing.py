"""The preprocessing the networks see: config (:data:`DEFAULT_PREPROCESS`), intensity scaling to 8 bit, median
filter, orientation normalisation, CLAHE, and :func:`unflip` to undo the flip on any output."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from mammo.imaging.breast import breast_height, breast_on_right, breast_threshold
from mammo.imaging.geometry import resize, working_size


#: The preprocessing used by training and inference; stored in every checkpoint (plain JSON types only).
#: Do not modify it in place: make a variant with ``dict(DEFAULT_PREPROCESS, key=value)``.
DEFAULT_PREPROCESS: dict[str, Any] = {
    # How 8/16-bit pixels become 8 bit:
    #   "bit_depth": uint8 unchanged; uint16 divided by (2**b - 1) / 255 where b is the smallest detector depth
    #       in (10, 12, 14, 16) bits that holds the image's maximum (a 12-bit image stored in a 16-bit PNG is
    #       not darkened 16x; a full-range 16-bit image, e.g. NYU or any DICOM read by read_image, uses b=16).
    #       The 8-bit copy of a 16-bit image (x / 257) gives the same result up to rounding.
    #   "percentile": linear stretch between the given percentiles of the foreground (pixels above the image
    #       minimum), per image; robust to burned-in labels, for mixed sources.
    "intensity_scaling": "bit_depth",
    "percentiles": [0.5, 99.5],          # (low, high) in percent, used by "percentile" only
    "median_kernel": 3,                  # median filter aperture in pixels (odd; 0 or 1 = off); issue spec: 3x3
    "clahe_clip_limit": 1.5,             # OpenCV CLAHE clipLimit; issue spec: 1.5 (0 = CLAHE off)
    "clahe_tile_grid": [8, 8],           # CLAHE tiles (rows, cols); issue spec: 8x8 (also the OpenCV default)
    "adaptive_clahe": False,             # stronger CLAHE for low-contrast images (also switchable per call)
    "adaptive_clahe_clip_limit": 3.0,    # clipLimit for low-contrast images when adaptive CLAHE is on (ours: 2x)
    # 8-bit std of the breast pixels (after the median) below which an image counts as low-contrast. Measured:
    # DDSM tissue 41-74 (never low); CDD-CESM DM median 39 (10% below 30), CM median 32 (~45% below 30).
    "low_contrast_std": 30.0,
    "normalize_orientation": True,       # mirror left-right so that the chest wall (breast base) is on the left
    # Working scale: the image is resized so that the breast is this many pixels high before the median filter and
    # CLAHE, whatever the input's resolution (0 = off: work at the input's own size). 960 px is the median breast
    # height of the stage-1 training images (DDSM tissue set 960, CSAW-S 967; imaging.breast_height on
    # ../shared/data). Pixel spacing is not used: the training images state none, and a size rule holds on every
    # input. Configs stored before this key existed get it from here (the shipped model was trained at about it).
    "working_breast_height_px": 960,
}


def check_preprocess_config(config: dict | None) -> dict[str, Any]:
    """Validate a preprocessing config and fill missing keys from :data:`DEFAULT_PREPROCESS`.

    Args:
        config: a (possibly partial) config dict, e.g. from a checkpoint. None means the default.

    Returns:
        A new complete dict (the input is not modified).

    Raises:
        ValueError: unknown keys or invalid values (the message names the key and the allowed values).
    """
    cfg = dict(DEFAULT_PREPROCESS)
    if config is None:
        return cfg
    unknown = sorted(set(config) - set(DEFAULT_PREPROCESS))
    if unknown:
        raise ValueError(f"unknown preprocessing config keys {unknown}; known: {sorted(DEFAULT_PREPROCESS)}")
    cfg.update(config)
    if cfg["intensity_scaling"] not in ("bit_depth", "percentile"):
        raise ValueError(f"intensity_scaling must be 'bit_depth' or 'percentile', got {cfg['intensity_scaling']!r}")
    lo, hi = (float(v) for v in cfg["percentiles"])
    if not 0 <= lo < hi <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {cfg['percentiles']!r}")
    k = int(cfg["median_kernel"])
    if k < 0 or (k > 1 and k % 2 == 0):
        raise ValueError(f"median_kernel must be 0/1 (off) or an odd number of pixels, got {k}")
    if float(cfg["clahe_clip_limit"]) < 0 or float(cfg["adaptive_clahe_clip_limit"]) < 0:
        raise ValueError("CLAHE clip limits must be >= 0")
    grid = list(cfg["clahe_tile_grid"])
    if len(grid) != 2 or min(int(g) for g in grid) < 1:
        raise ValueError(f"clahe_tile_grid must be two positive ints (rows, cols), got {cfg['clahe_tile_grid']!r}")
    target = cfg["working_breast_height_px"]
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"working_breast_height_px must be a whole number of pixels >= 0 (0 = off), got {target!r}")
    return cfg


def _effective_depth(max_value: int) -> int:
    for bits in (10, 12, 14, 16):
        if max_value <= 2**bits - 1:
            return bits
    return 16


def scale_to_uint8(pixels: np.ndarray, config: dict | None = None) -> np.ndarray:
    """Intensity scaling step of :func:`preprocess` alone (see ``DEFAULT_PREPROCESS["intensity_scaling"]``).

    Args:
        pixels: ``(H, W)`` uint8 or uint16.
        config: preprocessing config (only ``intensity_scaling`` and ``percentiles`` are used).

    Returns:
        ``(H, W)`` uint8.

    Raises:
        TypeError: pixels are not uint8 / uint16. ValueError: bad config or shape.
    """
    cfg = check_preprocess_config(config)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise TypeError(f"expected uint8 or uint16 pixels (from read_image), got {pixels.dtype}")
    if pixels.ndim != 2:
        raise ValueError(f"expected (H, W) pixels, got shape {pixels.shape}")
    if cfg["intensity_scaling"] == "bit_depth":
        if pixels.dtype == np.uint8:
            return pixels.copy()
        full = 2 ** _effective_depth(int(pixels.max())) - 1
        return np.rint(pixels.astype(np.float32) * (255.0 / full)).astype(np.uint8)
    # percentile stretch over the foreground (pixels above the image minimum; the whole image if flat)
    values = pixels.astype(np.float32)
    foreground = values[values > values.min()]
    if foreground.size == 0:
        return np.zeros(pixels.shape, np.uint8)
    p_lo, p_hi = np.percentile(foreground, [float(v) for v in cfg["percentiles"]])
    if p_hi <= p_lo:
        p_lo, p_hi = float(values.min()), float(values.max())
    out = (values - p_lo) * (255.0 / max(p_hi - p_lo, 1e-6))
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


@dataclass
class Preprocessed:
    """Result of :func:`preprocess`.

    Attributes:
        image: ``(h, w)`` uint8, the network's view of the mammogram at the working scale (the input's ``(H, W)``
            scaled so that the breast is ``working_breast_height_px`` high; the input's size when that is 0).
        flipped: True when the image was mirrored left-right for orientation normalisation; undo with
            :func:`unflip` on every output derived from ``image`` (and :func:`to_input_size` to go back to ``(H, W)``).
        input_hw: the input's ``(H, W)``.
        clahe_clip_limit: the CLAHE clip limit actually used (the adaptive one for low-contrast images).
        breast_std: standard deviation of the 8-bit breast pixels before CLAHE (the low-contrast measure).
    """

    image: np.ndarray
    flipped: bool
    clahe_clip_limit: float = 0.0
    breast_std: float = 0.0
    input_hw: tuple[int, int] = (0, 0)

    @property
    def scale(self) -> float:
        """Working size / input size (rows), 1.0 when the image was not resized."""
        return self.image.shape[0] / self.input_hw[0] if self.input_hw[0] else 1.0

    def to_working(self, array: np.ndarray, interpolation: str = "nearest") -> np.ndarray:
        """An array of the input's ``(H, W)`` and orientation (a mask, a label map) in this image's frame: mirrored
        like it and resized to its ``(h, w)``."""
        return resize(unflip(array, self.flipped), self.image.shape[:2], interpolation)

    def to_input(self, array: np.ndarray, interpolation: str = "nearest") -> np.ndarray:
        """The inverse of :meth:`to_working`: an ``(..., h, w)`` array of this frame at the input's ``(H, W)`` and
        orientation."""
        return unflip(resize(array, self.input_hw, interpolation), self.flipped)


def preprocess(pixels: np.ndarray, config: dict | None = DEFAULT_PREPROCESS,
               adaptive_clahe: bool = False) -> Preprocessed:
    """Preprocess a mammogram for the networks; the same function for training and inference.

    Steps: (1) intensity scaling to 8 bit (:func:`scale_to_uint8`); (1b) the working scale: resized so that the
    breast (:func:`~mammo.imaging.breast.breast_height`) is ``working_breast_height_px`` high, so that the filters
    below and the networks see the same mammogram at any input resolution; (2) median filter (``median_kernel``,
    ``cv2.medianBlur``); (3) orientation normalisation (below); (4) CLAHE
    (``cv2.createCLAHE(clahe_clip_limit, clahe_tile_grid)``); when adaptive CLAHE is on (``adaptive_clahe``
    argument or config key) and the breast pixels' standard deviation after the median is below
    ``low_contrast_std``, ``adaptive_clahe_clip_limit`` is used instead. Orientation normalisation: mirrored
    left-right when :func:`breast_on_right` says the chest wall is on the right, so that the chest wall is
    always on the left and the breast points right (decided on the median-filtered image before CLAHE).
    This is the side of 49 of the 60 DDSM tissue training images (right MLO), so most training data needs no
    flip.

    Args:
        pixels: ``(H, W)`` uint8 or uint16 (``MammogramImage.pixels``).
        config: preprocessing config (:data:`DEFAULT_PREPROCESS`; partial dicts are completed from it).
        adaptive_clahe: switch adaptive CLAHE on for this call (in addition to ``config["adaptive_clahe"]``).

    Returns:
        Preprocessed(image ``(h, w)`` uint8 at the working scale, flipped, clahe_clip_limit, breast_std, input_hw).

    Raises:
        TypeError / ValueError: bad pixel type / shape or config (see :func:`check_preprocess_config`).
    """
    cfg = check_preprocess_config(config)
    img = scale_to_uint8(pixels, cfg)
    input_hw = (int(img.shape[0]), int(img.shape[1]))
    target = int(cfg["working_breast_height_px"])
    if target:
        img = resize(img, working_size(input_hw, breast_height(img), target), "linear")
    k = int(cfg["median_kernel"])
    if k > 1:
        img = cv2.medianBlur(img, k)
    flipped = bool(cfg["normalize_orientation"]) and breast_on_right(img)
    if flipped:  # before CLAHE, so that CLAHE always sees the canonical orientation
        img = np.ascontiguousarray(img[:, ::-1])
    breast = img[img > breast_threshold(img)]
    breast_std = float(breast.std()) if breast.size else 0.0
    clip = float(cfg["clahe_clip_limit"])
    if (adaptive_clahe or bool(cfg["adaptive_clahe"])) and breast_std < float(cfg["low_contrast_std"]):
        clip = float(cfg["adaptive_clahe_clip_limit"])
    if clip > 0:
        rows, cols = (int(g) for g in cfg["clahe_tile_grid"])
        img = cv2.createCLAHE(clipLimit=clip, tileGridSize=(cols, rows)).apply(img)
    return Preprocessed(image=img, flipped=flipped, clahe_clip_limit=clip, breast_std=breast_std, input_hw=input_hw)


def unflip(array: np.ndarray, flipped: bool) -> np.ndarray:
    """Undo the orientation flip of :func:`preprocess` on an ``(H, W)`` or ``(..., H, W)`` array.

    Works for numpy arrays and torch tensors (the last axis is mirrored). Returns the input unchanged when
    ``flipped`` is False, else a mirrored copy.
    """
    if not flipped:
        return array
    if hasattr(array, "flip") and not isinstance(array, np.ndarray):  # torch.Tensor
        return array.flip(-1)
    return np.ascontiguousarray(np.asarray(array)[..., ::-1])
