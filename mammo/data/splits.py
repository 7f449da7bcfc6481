"""Patient ids, the workspace tables and patient-level splits: the torch-free half of the datasets.

``prepare_to_train.py`` and the evaluation read file names and tables without loading PyTorch or albumentations,
so these live apart from the torch datasets of :mod:`mammo.training.datasets`.

Table layouts: the tissue table has ``image_file_path, label_file_path, patient_id, source, split``; the lesion
table ``image_file_path, roi_mask_file_path, patient_id, split`` (+ any extra columns). Paths in a CSV are relative
to the CSV's folder; the readers return absolute paths. The tables are read by ``tables.read_table``: every cell
normalised (``" Train "`` is ``train``, ``images\\a.png`` is ``images/a.png``), an unknown ``split`` value refused,
and ``A.PNG`` finds ``A.png`` on disk.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from mammo import imaging
from mammo.data import tables

__all__ = [
    "MASK_PATH_SEPARATOR",
    "TISSUE_LABEL_VALUES",
    "kfold_by_patient",
    "patient_id_from_name",
    "read_lesion_table",
    "read_tissue_table",
    "split_by_patient",
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


_TABLE_FIX = ("pass the workspace table written by prepare_to_train.py "
              "(tissue_dataset.csv / unified_segmentation_dataset.csv)")


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
