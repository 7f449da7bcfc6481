"""Tissue and lesion datasets, label maps, augmentation presets and patient-level splits.

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
import re
from pathlib import Path
from typing import Any, Callable

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

import imaging
import tables
from imaging import DEFAULT_PREPROCESS
from labels import TISSUE_CLASS_NAMES  # re-exported: the datasets' class ids (labels.py defines them)

__all__ = [
    "TISSUE_CLASS_NAMES",
    "TISSUE_LABEL_VALUES",
    "LesionDataset",
    "TissueDataset",
    "kfold_by_patient",
    "lesion_augmentation",
    "patient_id_from_name",
    "read_lesion_table",
    "read_tissue_table",
    "split_by_patient",
    "tissue_augmentation",
    "appearance_augmentation",
]


#: DDSM tissue label intensities -> class ids (the dataset's readme; ../shared/data/README.md):
#: 64 background, 128 adipose, 192 fibroglandular tissue (FGT), 255 pectoral muscle.
TISSUE_LABEL_VALUES: dict[int, int] = dict(imaging.TISSUE_LABEL_VALUES)

#: Separator of several ROI mask paths in one ``roi_mask_file_path`` cell (merged by union).
MASK_PATH_SEPARATOR = tables.PATH_SEPARATOR


# ----------------------------------------------------------------------------------------------------------------
# Patient ids and tables
# ----------------------------------------------------------------------------------------------------------------
_COPY_PREFIXES = ("flipped_", "mirrored_")
_PATIENT_PATTERNS = (
    re.compile(r"^(P\d+)_[LR]_"),                  # CDD-CESM: P105_R_CM_MLO
    re.compile(r"(P_\d{5})(?:_|$)"),               # CBIS-DDSM: Mass-Training_P_00001_LEFT_CC[_1]
    re.compile(r"^([A-D]_\d{4})_"),                # DDSM / Mini-DDSM case volumes: A_0002_1.RIGHT_MLO[_LI]
    re.compile(r"^(.+?)_[LR]-(?:CC|MLO)"),         # NYU sample data: 0_R-CC, 0_R-MLO_benign
)


def patient_id_from_name(name: str | os.PathLike) -> str:
    """Patient (or DDSM case) id from a file name, so that all views of one patient can be kept together.

    Rules, in order (directories and the extension are dropped first, then any ``flipped_`` / ``mirrored_``
    prefix of the augmented CDD-CESM copies):

    - CDD-CESM ``P105_R_CM_MLO`` -> ``P105``;
    - CBIS-DDSM ``Mass-Training_P_00001_LEFT_CC`` -> ``P_00001``;
    - DDSM / Mini-DDSM ``A_0002_1.RIGHT_MLO`` (and its label ``..._LI``) -> ``A_0002`` (the case);
    - NYU ``0_R-CC`` -> ``0``;
    - anything else: the name itself (each image its own patient; give an explicit ``patient_id`` column
      for such data, or the split may leak).

    Args:
        name: a file name or path.

    Returns:
        The patient id (str).
    """
    base = os.path.basename(str(name))
    for ext in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm", ".dicom", ".bmp", ".pgm"):
        if base.lower().endswith(ext):
            base = base[: -len(ext)]
            break
    changed = True
    while changed:
        changed = False
        for prefix in _COPY_PREFIXES:
            if base.startswith(prefix):
                base = base[len(prefix):]
                changed = True
    for pattern in _PATIENT_PATTERNS:
        m = pattern.search(base)
        if m:
            return m.group(1)
    return base


_TABLE_FIX = "pass the workspace table written by prepare_to_train.py (tissue_dataset.csv / unified_segmentation_dataset.csv)"


def _fill_patient_ids(df: pd.DataFrame) -> pd.DataFrame:
    if "patient_id" not in df.columns:
        df["patient_id"] = ""
    blank = df["patient_id"].astype(str).str.strip() == ""
    df.loc[blank, "patient_id"] = [patient_id_from_name(p) for p in df.loc[blank, "image_file_path"]]
    return df


def read_tissue_table(csv_or_dir: str | os.PathLike) -> pd.DataFrame:
    """Index of tissue images and label maps, from a CSV or from the DDSM tissue-label folder layout.

    Args:
        csv_or_dir: a CSV with ``image_file_path, label_file_path`` (+ optional ``patient_id, source, split``;
            relative paths are relative to the CSV's folder), or a folder holding ``fgt_seg/<name>.png`` and
            ``fgt_seg_labels/<name>_LI.png``.

    Returns:
        DataFrame with absolute ``image_file_path``, ``label_file_path``, and ``patient_id`` (derived with
        :func:`patient_id_from_name` where absent), ``source`` ("ddsm_tissue" for the folder layout) and
        ``split`` ("" where unknown), sorted by image path for the folder layout, CSV order otherwise.

    Raises:
        FileNotFoundError: no such CSV / folder, or images without their label file (all are listed).
        tables.TableError (a ValueError): a table that cannot be read, lacks columns, has no rows, or holds a
            ``split`` other than train / val / test / empty (see ``tables.read_table``).
    """
    path = Path(csv_or_dir)
    if path.is_dir():
        img_dir, lab_dir = path / "fgt_seg", path / "fgt_seg_labels"
        if not img_dir.is_dir() or not lab_dir.is_dir():
            raise FileNotFoundError(f"{str(path)!r} is not a DDSM tissue-label folder: expected the sub-folders "
                                    "fgt_seg/ and fgt_seg_labels/ (or pass the workspace's tissue_dataset.csv)")
        images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() == ".png")
        if not images:
            raise FileNotFoundError(f"no PNG images in {str(img_dir)!r}")
        labels = [tables.existing_path(lab_dir / f"{p.stem}_LI.png") for p in images]
        missing = [str(lab) for lab in labels if not lab.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} tissue image(s) lack their label file: {missing[:5]}"
                                    + (" ..." if len(missing) > 5 else ""))
        df = pd.DataFrame({"image_file_path": [str(p) for p in images],
                           "label_file_path": [str(p) for p in labels],
                           "source": "ddsm_tissue", "split": ""})
        return _fill_patient_ids(df)[["image_file_path", "label_file_path", "patient_id", "source", "split"]]
    df = tables.read_table(path, ("image_file_path", "label_file_path"), what="tissue table", fix=_TABLE_FIX)
    root = path.parent
    df["image_file_path"] = [tables.resolve_path(root, v) for v in df["image_file_path"]]
    df["label_file_path"] = [tables.resolve_path(root, v) for v in df["label_file_path"]]
    for col in ("source", "split"):
        if col not in df.columns:
            df[col] = ""
    return _fill_patient_ids(df)


def read_lesion_table(csv: str | os.PathLike) -> pd.DataFrame:
    """Index of lesion images and ROI masks from a CSV (``unified_segmentation_dataset.csv``).

    Args:
        csv: CSV with ``image_file_path, roi_mask_file_path`` (+ optional ``patient_id, split`` and extras).
            ``roi_mask_file_path`` empty = a lesion-free image; several masks joined by ";" are merged by union.
            Relative paths are relative to the CSV's folder.

    Returns:
        DataFrame with absolute paths (masks re-joined with ";"), ``patient_id`` (derived where absent or
        blank) and ``split`` ("" where absent), other columns kept.

    Raises:
        FileNotFoundError: no such CSV.
        tables.TableError (a ValueError): as for :func:`read_tissue_table`.
    """
    path = Path(csv)
    df = tables.read_table(path, ("image_file_path", "roi_mask_file_path"), what="lesion table", fix=_TABLE_FIX)
    root = path.parent
    df["image_file_path"] = [tables.resolve_path(root, v) for v in df["image_file_path"]]
    df["roi_mask_file_path"] = [tables.resolve_paths(root, v) for v in df["roi_mask_file_path"]]
    if "split" not in df.columns:
        df["split"] = ""
    return _fill_patient_ids(df)


# ----------------------------------------------------------------------------------------------------------------
# Patient-level splits
# ----------------------------------------------------------------------------------------------------------------
def _patients(df: pd.DataFrame) -> pd.Series:
    if "patient_id" in df.columns:
        ids = df["patient_id"].astype(str)
        blank = ids.str.strip() == ""
        if blank.any():
            ids = ids.copy()
            ids[blank] = [patient_id_from_name(p) for p in df.loc[blank, "image_file_path"]]
        return ids
    if "image_file_path" not in df.columns:
        raise ValueError("splitting needs a patient_id or an image_file_path column")
    return df["image_file_path"].map(patient_id_from_name)


def _shuffled_patients(ids: pd.Series, seed: int) -> list[str]:
    unique = sorted(set(ids))  # sorted first: the split depends on the seed and the ids, not on row order
    order = np.random.default_rng(seed).permutation(len(unique))
    return [unique[i] for i in order]


def _take(df: pd.DataFrame, mask: np.ndarray, split: str) -> pd.DataFrame:
    out = df.loc[mask].copy()
    out["split"] = split
    return out.reset_index(drop=True)


def split_by_patient(df: pd.DataFrame, val_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded train / validation split that keeps every image of a patient on one side.

    Patients (``patient_id`` column, else :func:`patient_id_from_name` of ``image_file_path``; the ``flipped_``
    / ``mirrored_`` CDD-CESM copies share their patient's id) are shuffled with ``numpy.random.default_rng(seed)``
    and moved to validation one at a time until it holds at least ``round(val_fraction * n_images)`` images.

    Args:
        df: table with ``patient_id`` and/or ``image_file_path``.
        val_fraction: wanted fraction of images in validation, 0 < f < 1.
        seed: random seed; the same seed and ids give the same split.

    Returns:
        ``(train_df, val_df)``: copies with the index reset and ``split`` set to "train" / "val".

    Raises:
        ValueError: bad fraction, or fewer than 2 patients.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    ids = _patients(df)
    patients = _shuffled_patients(ids, seed)
    if len(patients) < 2:
        raise ValueError(f"cannot split {len(df)} images of {len(patients)} patient(s) by patient: need >= 2")
    counts = ids.value_counts()
    target = max(1, int(round(val_fraction * len(df))))
    val_patients: set[str] = set()
    n_val = 0
    for pid in patients[:-1]:  # the last patient always stays in training
        if n_val >= target:
            break
        val_patients.add(pid)
        n_val += int(counts[pid])
    in_val = ids.isin(val_patients).to_numpy()
    return _take(df, ~in_val, "train"), _take(df, in_val, "val")


def kfold_by_patient(df: pd.DataFrame, k: int, fold: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Seeded patient-level k-fold cross-validation split.

    Patients are shuffled (``numpy.random.default_rng(seed)``) and each is given to the fold that holds the
    fewest images so far (ties: lowest fold index), so folds are balanced in images and no patient spans two
    folds.

    Args:
        df: table with ``patient_id`` and/or ``image_file_path``.
        k: number of folds (>= 2).
        fold: which fold is the validation set, 0 <= fold < k.
        seed: random seed.

    Returns:
        ``(train_df, val_df)``: copies with the index reset and ``split`` set to "train" / "val".

    Raises:
        ValueError: bad k / fold, or fewer patients than folds.
    """
    if k < 2:
        raise ValueError(f"k must be >= 2, got {k}")
    if not 0 <= fold < k:
        raise ValueError(f"fold must be in [0, {k - 1}], got {fold}")
    ids = _patients(df)
    patients = _shuffled_patients(ids, seed)
    if len(patients) < k:
        raise ValueError(f"{len(patients)} patients cannot fill {k} folds")
    counts = ids.value_counts()
    sizes = [0] * k
    fold_of: dict[str, int] = {}
    for pid in patients:
        f = int(np.argmin(sizes))
        fold_of[pid] = f
        sizes[f] += int(counts[pid])
    in_val = (ids.map(fold_of) == fold).to_numpy()
    return _take(df, ~in_val, "train"), _take(df, in_val, "val")


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

    def _read_image(self, path: str) -> tuple[np.ndarray, bool]:
        pixels = imaging.read_image(path).pixels
        if self.preprocess_config is None:
            if pixels.dtype != np.uint8:
                raise ValueError(f"{path!r}: preprocess_config=None expects already preprocessed 8-bit images, "
                                 f"found {pixels.dtype}; pass the checkpoint's preprocessing config instead")
            return pixels, False
        pre = imaging.preprocess(pixels, self.preprocess_config)
        return pre.image, pre.flipped

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
        image, flipped = self._read_image(path)
        labels = imaging.read_mask(label_path, kind="partial_tissue")
        if flipped:
            labels = np.ascontiguousarray(labels[:, ::-1])
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
        image, flipped = self._read_image(path)
        mask = self.read_mask(index, image.shape)
        if flipped:
            mask = np.ascontiguousarray(mask[:, ::-1])
        image, mask, geom = self._transform(image, mask, path, str(self.table.iloc[index]["roi_mask_file_path"]))
        return {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32) / 255.0)[None],
                "mask": torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None],
                "path": path, "geometry": geom, "flipped": flipped}
