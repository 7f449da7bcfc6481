"""Small procedural mammogram-like images with exact labels, for smoke tests and the quick start.

What is drawn (all sizes in pixels, (H, W) = ``(height, width)``):

- a breast outline: a half-ellipse attached to the chest wall at the left image edge (a right breast; left
  breasts are the mirror image), filling most of the image height;
- a pectoral muscle wedge: a triangle in the upper-left corner (MLO views only, as in real MLO views);
- fibroglandular tissue (FGT): a smooth random field, thresholded, inside the breast and away from the skin;
- lesions (lesion images only): 0 to ``max_lesions`` bright elliptical blobs inside the breast.

Tissue labels use the DDSM tissue-label encoding of the real set (64 background, 128 adipose, 192 FGT,
255 pectoral muscle; see ``../shared/data/README.md``); lesion masks are 0/255. Every sample is made from its
own generator ``numpy.random.default_rng([seed, index])``, so sample ``i`` is the same whatever ``n`` is, and
two runs with one seed give identical arrays.

This is a smoke-test default: it exercises the data path end to end with no download. It is never a stand-in
for real data in any reported figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

#: DDSM tissue-label intensities (dataset readme of tiryakiv/Mammogram-segmentation, verified on the real files).
LABEL_BACKGROUND, LABEL_ADIPOSE, LABEL_FGT, LABEL_PECTORAL = 64, 128, 192, 255

#: Version of the drawing code; part of the preparer's cache key, so bump it when the pictures change.
GENERATOR_VERSION = 1

DEFAULT_HEIGHT = 256  # pixels
DEFAULT_WIDTH = 128  # pixels


@dataclass
class SyntheticCase:
    """One synthetic mammogram with its labels.

    Attributes:
        name: file stem, unique within a set (e.g. ``"SYN0003_R_MLO"``).
        patient_id: two views (CC and MLO) of one breast share a patient (e.g. ``"SYN0003"``).
        laterality: ``"L"`` or ``"R"``.
        view: ``"CC"`` or ``"MLO"``.
        image: (H, W) uint8 grayscale picture.
        tissue_label: (H, W) uint8 with values in {64, 128, 192, 255}.
        lesion_mask: (H, W) uint8 in {0, 255}; all zero for a lesion-free sample.
        n_lesions: number of blobs drawn (0 = lesion-free).
    """

    name: str
    patient_id: str
    laterality: str
    view: str
    image: np.ndarray
    tissue_label: np.ndarray
    lesion_mask: np.ndarray
    n_lesions: int


def _smooth_field(rng: np.random.Generator, height: int, width: int, sigma: float) -> np.ndarray:
    """(H, W) float32 smooth random field scaled to [0, 1]; ``sigma`` in pixels."""
    noise = rng.standard_normal((height, width)).astype(np.float32)
    field = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)
    lo, hi = float(field.min()), float(field.max())
    return (field - lo) / max(hi - lo, 1e-6)


def make_case(index: int, seed: int = 0, height: int = DEFAULT_HEIGHT, width: int = DEFAULT_WIDTH,
              max_lesions: int = 3) -> SyntheticCase:
    """Draw synthetic case number ``index``.

    Cases come in pairs (CC then MLO of one breast: ``patient_id`` = ``SYN{index // 2:04d}``); the side
    alternates between patients; every fourth case (``index % 4 == 1``) is lesion-free, the others get
    1..``max_lesions`` blobs.

    Args:
        index: case number (>= 0).
        seed: set seed; with ``index`` it fixes the picture.
        height, width: image size in pixels (each >= 32).
        max_lesions: upper bound of blobs on a lesion image (>= 1).

    Returns:
        The :class:`SyntheticCase`.

    Raises:
        ValueError: for a size under 32 pixels, a negative index or ``max_lesions < 1``.
    """
    if height < 32 or width < 32:
        raise ValueError(f"synthetic image size must be at least 32x32 pixels, got {height}x{width}")
    if index < 0 or max_lesions < 1:
        raise ValueError(f"need index >= 0 and max_lesions >= 1, got index={index}, max_lesions={max_lesions}")
    rng = np.random.default_rng([int(seed), int(index)])
    patient = index // 2
    view = "CC" if index % 2 == 0 else "MLO"
    laterality = "R" if patient % 2 == 0 else "L"

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # Breast: half-ellipse on the chest wall (x = 0); semi-axes in pixels.
    cy = height * rng.uniform(0.45, 0.55)
    semi_y = height * rng.uniform(0.38, 0.46)
    semi_x = width * rng.uniform(0.70, 0.90)
    radial = (xx / semi_x) ** 2 + ((yy - cy) / semi_y) ** 2
    breast = radial <= 1.0

    label = np.full((height, width), LABEL_BACKGROUND, np.uint8)
    label[breast] = LABEL_ADIPOSE
    # Fibroglandular tissue: smooth field above a threshold, kept inside an inner ellipse (away from the skin).
    field = _smooth_field(rng, height, width, sigma=max(height, width) / 24.0)
    threshold = rng.uniform(0.50, 0.62)
    fgt = (field > threshold) & (radial <= 0.65)
    label[fgt] = LABEL_FGT
    pectoral = np.zeros_like(breast)
    if view == "MLO":
        ph = height * rng.uniform(0.30, 0.45)
        pw = width * rng.uniform(0.25, 0.40)
        pectoral = (xx / pw + yy / ph) <= 1.0
        label[pectoral] = LABEL_PECTORAL

    # Picture: one mean grey level per class, texture, then a light blur.
    means = {LABEL_BACKGROUND: 6.0, LABEL_ADIPOSE: 85.0, LABEL_FGT: 165.0, LABEL_PECTORAL: 205.0}
    image = np.zeros((height, width), np.float32)
    for value, mean in means.items():
        image[label == value] = mean
    texture = _smooth_field(rng, height, width, sigma=2.0) - 0.5
    image += np.where(label == LABEL_BACKGROUND, 2.0, 30.0).astype(np.float32) * texture

    mask = np.zeros((height, width), np.uint8)
    n_lesions = 0 if index % 4 == 1 else int(rng.integers(1, max_lesions + 1))
    inside = np.argwhere(fgt | (breast & ~pectoral & (radial <= 0.5)))
    for _ in range(n_lesions):
        y0, x0 = inside[int(rng.integers(len(inside)))] if len(inside) else (int(cy), width // 4)
        axes = (int(rng.integers(3, max(4, width // 10))), int(rng.integers(3, max(4, width // 10))))
        angle = float(rng.uniform(0, 180))
        cv2.ellipse(mask, (int(x0), int(y0)), axes, angle, 0, 360, 255, thickness=-1)
    mask &= np.where(breast & ~pectoral, 255, 0).astype(np.uint8)
    if n_lesions and not mask.any():  # a blob clipped away entirely: keep the count honest
        n_lesions = 0
    image[mask > 0] = 235.0
    label[mask > 0] = LABEL_FGT  # a dense lesion counts as fibroglandular tissue in the tissue labels
    image = cv2.GaussianBlur(image, (0, 0), sigmaX=0.8)
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    if laterality == "L":  # a left breast is the mirror image of a right one
        image_u8, label, mask = (np.ascontiguousarray(a[:, ::-1]) for a in (image_u8, label, mask))
    name = f"SYN{patient:04d}_{laterality}_{view}"
    return SyntheticCase(name=name, patient_id=f"SYN{patient:04d}", laterality=laterality, view=view,
                         image=image_u8, tissue_label=label, lesion_mask=mask, n_lesions=n_lesions)
