"""Tissue and lesion datasets and augmentation presets (the patient ids, tables and splits: :mod:`mammo.data.splits`).

Files -> network-ready tensors. Each dataset item is a dict:

- ``image``: ``(1, H, W)`` float32 in [0, 1] (H, W = the network size ``size_hw``, multiples of 32);
- ``mask``: tissue ``(H, W)`` int64 classes 0..3 (:data:`TISSUE_CLASS_NAMES`); lesion ``(1, H, W)`` float32 in {0, 1};
- ``path``: the image file (str);
- ``geometry``: the letterbox geometry as a flat dict of ints (:meth:`imaging.LetterboxGeometry.to_dict`;
  only valid for items that were not augmented, i.e. evaluation);
- ``flipped``: bool, True when orientation normalisation mirrored the image (and the mask with it).

Pipeline per item: :func:`imaging.read_image` -> :func:`imaging.preprocess` with the dataset's preprocessing
config (or nothing when ``preprocess_config=None``: the files are already preprocessed 8-bit images, e.g. the
stage-2 ROI crop cache) -> the mask is mirrored with the image when orientation normalisation flipped it ->
:func:`imaging.letterbox` to ``size_hw`` (image linear, mask nearest) -> augmentation (training only) ->
tensors. Datasets hold only plain data and picklable albumentations pipelines, so they work in DataLoader
worker processes started by spawn; each worker reseeds its augmentation pipeline from ``torch.initial_seed()``
(different per worker and per epoch) so that workers do not repeat one another's augmentations.

Table layouts (see the project's module contract): the tissue table has ``image_file_path, label_file_path,
patient_id, source, split``; the lesion table ``image_file_path, roi_mask_file_path, patient_id, split`` (+ any
extra columns). Paths in a CSV are relative to the CSV's folder; the readers return absolute paths. The tables are
read by ``tables.read_table``: every cell normalised (``" Train "`` is ``train``, ``images\\a.png`` is
``images/a.png``), an unknown ``split`` value refused, and ``A.PNG`` finds ``A.png`` on disk.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from mammo import imaging
from mammo.core.labels import TISSUE_CLASS_NAMES  # re-exported: the datasets' class ids (labels.py defines them)
from mammo.data.splits import MASK_PATH_SEPARATOR, read_lesion_table, read_tissue_table
from mammo.imaging import DEFAULT_PREPROCESS

__all__ = [
    "TISSUE_CLASS_NAMES",
    "LesionDataset",
    "TissueDataset",
    "appearance_augmentation",
    "lesion_augmentation",
    "tissue_augmentation",
]


# ----------------------------------------------------------------------------------------------------------------
# Augmentation presets
# ----------------------------------------------------------------------------------------------------------------
def tissue_augmentation(hflip_p: float = 0.5, vflip_p: float = 0.3, rotate_limit_deg: float = 15.0,
                        rotate_p: float = 0.5, brightness_contrast_p: float = 0.5, noise_p: float = 0.3,
                        appearance: bool = False, seed: int | None = None) -> A.Compose:
    """Stage-1 (tissue) augmentation: horizontal flip, vertical flip (p=0.3), rotation (+-15 deg),
    brightness/contrast (+-0.2, albumentations default), Gaussian noise (std 1-4 % of the 8-bit range), and with
    ``appearance=True`` the film-to-digital appearance transforms of :func:`appearance_augmentation`.

    Geometric transforms move the image and the mask together; masks use nearest interpolation and zero fill
    (background is class 0), so label maps keep integer classes. Constants: the project issue's list; the
    noise strength is ours (mild, below film grain). Note: with orientation normalisation on, horizontal flips
    show the network mirrored breasts it will not meet at inference (harmless, but set ``hflip_p=0`` to train
    only on the canonical side).

    Args:
        hflip_p, vflip_p, rotate_p, brightness_contrast_p, noise_p: probabilities of each transform.
        rotate_limit_deg: rotation range in degrees (uniform in +-limit).
        appearance: add :func:`appearance_augmentation` (before the noise).
        seed: seed of the pipeline's random generators (None: random; datasets reseed per worker anyway).

    Returns:
        An ``albumentations.Compose`` taking ``image`` ``(H, W)`` uint8 and ``mask`` ``(H, W)``.
    """
    return A.Compose([
        A.HorizontalFlip(p=hflip_p),
        A.VerticalFlip(p=vflip_p),
        A.Rotate(limit=rotate_limit_deg, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=rotate_p),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=brightness_contrast_p),
        *(appearance_augmentation().transforms if appearance else []),
        A.GaussNoise(std_range=(0.01, 0.04), p=noise_p),
    ], seed=seed)


def appearance_augmentation(curve_p: float = 0.8, clahe_p: float = 0.3, texture_p: float = 0.4) -> A.Compose:
    """Intensity and texture changes that span screen-film and processed digital (FFDM) mammograms.

    Stage 1 learned on film calls nearly the whole digital breast FGT (``../shared/FINDINGS.md``): on film, fat is
    dark and dense tissue bright, while the processing of digital mammograms (peripheral equalisation, strong
    unsharp masking) lifts the fat and flattens the contrast. A global intensity map at test time does not fix it
    (same file), so the network is shown other curves and textures while it learns, and must rely on the tissue's
    texture and local contrast rather than on absolute grey levels:

    - one intensity curve (p ``curve_p``): ``RandomGamma`` with gamma 0.4-2.5 (the range FINDINGS.md tried at test
      time) or ``RandomToneCurve`` (scale 0.3);
    - a second CLAHE pass with clip limit 1-4 (p ``clahe_p``; the suite's own preprocessing uses 1.5, its
      adaptive mode 3.0);
    - one texture change (p ``texture_p``): Gaussian blur (kernel 3-7 px), sharpening (alpha 0.2-0.5) or an unsharp
      mask (kernel 3-9 px, alpha 0.2-0.6), as digital systems apply.

    Ranges are ours, chosen to cover the test-time curves of FINDINGS.md and albumentations' defaults; only the image
    changes (the mask is untouched).

    Returns:
        An ``albumentations.Compose`` of the transforms above (its ``.transforms`` are spliced into
        :func:`tissue_augmentation`).
    """
    return A.Compose([
        A.OneOf([A.RandomGamma(gamma_limit=(40, 250)), A.RandomToneCurve(scale=0.3)], p=curve_p),
        A.CLAHE(clip_limit=(1.0, 4.0), tile_grid_size=(8, 8), p=clahe_p),
        A.OneOf([A.GaussianBlur(blur_limit=(3, 7)), A.Sharpen(alpha=(0.2, 0.5), lightness=(0.8, 1.2)),
                 A.UnsharpMask(blur_limit=(3, 9), alpha=(0.2, 0.6))], p=texture_p),
    ])


def lesion_augmentation(hflip_p: float = 0.5, brightness_contrast_p: float = 0.5, affine_p: float = 0.5,
                        elastic_p: float = 0.3, seed: int | None = None) -> A.Compose:
    """Stage-2 (lesion) augmentation: horizontal flip, brightness/contrast (+-0.2), shift-scale-rotate
    (``A.Affine``: shift +-6.25 %, scale 0.9-1.1, rotation +-15 deg; albumentations' ShiftScaleRotate defaults
    for shift/scale), elastic transform (alpha 1000, sigma 30: measured mean displacement ~2.5 px, max ~7 px,
    independent of image size).

    Masks use nearest interpolation and zero fill, so they stay binary.

    Args:
        hflip_p, brightness_contrast_p, affine_p, elastic_p: probabilities of each transform.
        seed: seed of the pipeline's random generators.

    Returns:
        An ``albumentations.Compose`` taking ``image`` ``(H, W)`` uint8 and ``mask`` ``(H, W)``.
    """
    return A.Compose([
        A.HorizontalFlip(p=hflip_p),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=brightness_contrast_p),
        A.Affine(translate_percent=(-0.0625, 0.0625), scale=(0.9, 1.1), rotate=(-15, 15),
                 interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                 border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=affine_p),
        A.ElasticTransform(alpha=1000, sigma=30, interpolation=cv2.INTER_LINEAR,
                           mask_interpolation=cv2.INTER_NEAREST, border_mode=cv2.BORDER_CONSTANT,
                           fill=0, fill_mask=0, p=elastic_p),
    ], seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------
def _in_frame(pre: imaging.Preprocessed, mask: np.ndarray, path: str, mask_desc: str) -> np.ndarray:
    """A mask or label map of the input image brought into the preprocessed image's frame (mirrored like it, resized
    with nearest to its working size).

    Raises:
        ValueError: the mask's shape is not the input image's (the message names both files).
    """
    if mask.shape != tuple(pre.input_hw):
        raise ValueError(f"mask {mask_desc!r} has shape {mask.shape} but image {path!r} has {tuple(pre.input_hw)}; "
                         "masks must match their image pixel for pixel (re-run prepare_to_train.py)")
    return np.ascontiguousarray(pre.to_working(mask, "nearest"))


class _MammogramDataset(Dataset):
    """Common read -> preprocess -> letterbox -> augment -> tensor pipeline (see the module docstring)."""

    def __init__(self, table: pd.DataFrame, size_hw: tuple[int, int] | int,
                 preprocess_config: dict | None = DEFAULT_PREPROCESS, augment: Callable | None = None,
                 split: str | None = None) -> None:
        if split is not None:
            if "split" not in table.columns:
                raise ValueError(f"split={split!r} requested but the table has no 'split' column")
            table = table[table["split"] == split]
        if len(table) == 0:
            raise ValueError("empty dataset" + (f" (no rows with split == {split!r})" if split else ""))
        self.table = table.reset_index(drop=True)
        self.size_hw = imaging.network_size(size_hw)
        self.preprocess_config = (None if preprocess_config is None
                                  else imaging.check_preprocess_config(preprocess_config))
        self.augment = augment
        self._seeded_pid: int | None = None

    def __len__(self) -> int:
        return len(self.table)

    def _read_image(self, path: str) -> imaging.Preprocessed:
        """The image as the network sees it (``imaging.preprocess``: working scale, orientation); with
        ``preprocess_config=None`` the file as it is (already preprocessed), in a ``Preprocessed`` of scale 1."""
        pixels = imaging.read_image(path).pixels
        if self.preprocess_config is None:
            if pixels.dtype != np.uint8:
                raise ValueError(f"{path!r}: preprocess_config=None expects already preprocessed 8-bit images, "
                                 f"found {pixels.dtype}; pass the checkpoint's preprocessing config instead")
            return imaging.Preprocessed(pixels, False, input_hw=(int(pixels.shape[0]), int(pixels.shape[1])))
        return imaging.preprocess(pixels, self.preprocess_config)

    def _maybe_reseed(self) -> None:
        # Each process (main or DataLoader worker) seeds its own copy of the pipeline once, from torch's
        # per-worker seed, so workers do not replay identical augmentation streams.
        if self.augment is not None and self._seeded_pid != os.getpid():
            if hasattr(self.augment, "set_random_seed"):
                self.augment.set_random_seed(int(torch.initial_seed() % 2**32))
            self._seeded_pid = os.getpid()

    def _transform(self, image: np.ndarray, mask: np.ndarray, path: str, mask_desc: str
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
        if mask.shape != image.shape:
            raise ValueError(f"mask {mask_desc!r} has shape {mask.shape} but image {path!r} has {image.shape}; "
                             "masks must match their image pixel for pixel (re-run prepare_to_train.py)")
        image, geom = imaging.letterbox(image, self.size_hw, "linear")
        mask, _ = imaging.letterbox(mask, self.size_hw, "nearest")
        if self.augment is not None:
            self._maybe_reseed()
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
            if image.ndim == 3:
                image = image[:, :, 0]
        return image, mask, geom.to_dict()


class TissueDataset(_MammogramDataset):
    """Stage-1 dataset: whole mammograms with 4-class tissue label maps.

    Args:
        table: DataFrame from :func:`read_tissue_table`, or a CSV path / DDSM tissue folder passed to it.
        size_hw: network size (h, w), multiples of 32, or one int for a square.
        preprocess_config: :mod:`imaging` preprocessing config (stored in the checkpoint); None when the image
            files are already preprocessed 8-bit images.
        augment: albumentations pipeline (e.g. :func:`tissue_augmentation`) for training; None otherwise.
        split: keep only rows whose ``split`` equals this ("train", "val", "test"); None keeps all.

    Items: ``image`` (1, H, W) float32 [0, 1]; ``mask`` (H, W) int64 in 0..3, or a partial-label code
    (``labels.ADIPOSE_OR_FGT`` 4, ``labels.IGNORE`` 255) where the label file holds 160 / 32; ``path``;
    ``geometry``; ``flipped``.

    Raises (on reading an item): ImageReadError for unreadable files; ValueError for label values other than
    64/128/192/255 and the partial 160/32 (naming the file and the values) or an image / label size mismatch.
    """

    num_classes = len(TISSUE_CLASS_NAMES)

    def __init__(self, table: pd.DataFrame | str | os.PathLike, size_hw: tuple[int, int] | int,
                 preprocess_config: dict | None = DEFAULT_PREPROCESS, augment: Callable | None = None,
                 split: str | None = None) -> None:
        if not isinstance(table, pd.DataFrame):
            table = read_tissue_table(table)
        super().__init__(table, size_hw, preprocess_config, augment, split)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.table.iloc[index]
        path, label_path = str(row["image_file_path"]), str(row["label_file_path"])
        pre = self._read_image(path)
        image, flipped = pre.image, pre.flipped
        labels = _in_frame(pre, imaging.read_mask(label_path, kind="partial_tissue"), path, label_path)
        image, labels, geom = self._transform(image, labels, path, label_path)
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / 255.0)[None],
                "mask": torch.from_numpy(np.ascontiguousarray(labels).astype(np.int64)),
                "path": path, "geometry": geom, "flipped": flipped}


class LesionDataset(_MammogramDataset):
    """Stage-2 dataset: mammograms (or ROI crops) with binary lesion masks.

    Args:
        table: DataFrame from :func:`read_lesion_table`, or a CSV path passed to it.
        size_hw, preprocess_config, augment, split: as for :class:`TissueDataset` (augmentation e.g.
            :func:`lesion_augmentation`).

    Masks: an empty ``roi_mask_file_path`` gives an all-zero mask; several paths joined by ";" are merged by
    union; each is read with :func:`imaging.read_mask` (JPEG thresholded > 127; PNG 0/1 or 0/255).

    Items: ``image`` (1, H, W) float32 [0, 1]; ``mask`` (1, H, W) float32 in {0, 1}; ``path``; ``geometry``;
    ``flipped``.

    Raises (on reading an item): ImageReadError for unreadable files; ValueError for non-binary lossless masks
    or an image / mask size mismatch.
    """

    def __init__(self, table: pd.DataFrame | str | os.PathLike, size_hw: tuple[int, int] | int,
                 preprocess_config: dict | None = DEFAULT_PREPROCESS, augment: Callable | None = None,
                 split: str | None = None) -> None:
        if not isinstance(table, pd.DataFrame):
            table = read_lesion_table(table)
        super().__init__(table, size_hw, preprocess_config, augment, split)

    def read_mask(self, index: int, shape: tuple[int, int]) -> np.ndarray:
        """The union of row ``index``'s ROI masks, ``(H, W)`` uint8 in {0, 1} (zeros when it has none)."""
        cell = str(self.table.iloc[index]["roi_mask_file_path"] or "")
        mask = np.zeros(shape, np.uint8)
        for mask_path in (p for p in cell.split(MASK_PATH_SEPARATOR) if p.strip()):
            m = imaging.read_mask(mask_path, kind="binary")
            if m.shape != shape:
                raise ValueError(f"mask {mask_path!r} has shape {m.shape} but its image has {shape}; masks must "
                                 "match their image pixel for pixel (re-run prepare_to_train.py)")
            mask |= m
        return mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = str(self.table.iloc[index]["image_file_path"])
        pre = self._read_image(path)
        image, flipped = pre.image, pre.flipped
        mask = _in_frame(pre, self.read_mask(index, pre.input_hw), path, "its masks")
        image, mask, geom = self._transform(image, mask, path, str(self.table.iloc[index]["roi_mask_file_path"]))
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / 255.0)[None],
                "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
                "path": path, "geometry": geom, "flipped": flipped}
