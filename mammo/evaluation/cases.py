"""Ground truth of the evaluation: the cases of each layout, their lesion masks, and the patient filters.

What lives here (the scores are ``scores.py``, the predictors ``predictors.py``, the command line ``evaluate.py``):

- :class:`Case` (one image and its truth files) and :func:`acquisition_group` (DM / CM of CDD-CESM);
- the four layouts: :func:`tissue_cases` (DDSM tissue-label folder or workspace CSV), :func:`lesion_cases`
  (workspace CSV or ``images/`` + ``masks/`` folder), :func:`density_cases` (VinDr dense-tissue masks) and
  :func:`csaw_cases` (CSAW-S pectoral and cancer masks); :func:`read_lesion_truth` (a case's lesion masks, merged);
- leaving a model's training patients out: :func:`read_patient_list` and :func:`exclude_patients`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mammo import imaging
from mammo.cascade import checks
from mammo.core import labels
from mammo.data import tables


# ------------------------------------------------------------------------------------------------ ground truth
@dataclass
class Case:
    """One ground-truth item: the image, its truth file(s) and its acquisition group ("DM", "CM" or "")."""

    stem: str
    image_path: str
    truth_path: str  # tissue label map, or lesion masks joined by ";" ("" = lesion-free)
    group: str = ""
    patient: str = ""  # CSAW-S patient id (the stem before "_"); "" elsewhere
    pectoral_path: str = ""  # CSAW-S pectoral_muscle mask ("" = none)


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
    split = tables.normalise_split_name(split)
    if "split" not in df.columns or not (df["split"] == split).any():
        found = sorted(set(df.get('split', [])))
        raise ValueError(f"{source}: no rows with split == {split!r} (splits found: {found})")
    return df[df["split"] == split]


def tissue_cases(tissue_dir: str | None, tissue_csv: str | None, split: str | None) -> list[Case]:
    """Tissue ground truth from the DDSM folder layout (``--tissue-dir``) or a workspace CSV (``--tissue-csv``), both
    read by ``splits.read_tissue_table``; ``split`` keeps one split of a CSV.

    Raises:
        FileNotFoundError, ValueError: the folder or table cannot be used (``checks.UserInputError``: a file
            where a folder goes or the reverse; ``tables.TableError``: an unreadable table, missing columns, an
            unknown split value, files that do not exist or are not images); one line naming the file and the fix.
    """
    from mammo.data import splits

    if tissue_dir:
        checks.input_folder(tissue_dir, "--tissue-dir", "pass the DDSM tissue-label folder (fgt_seg/ + "
                                 "fgt_seg_labels/), or a workspace table with --tissue-csv")
    if tissue_csv:
        checks.input_file(tissue_csv, "--tissue-csv", "pass the workspace's tissue_dataset.csv, or a DDSM "
                               "tissue-label folder with --tissue-dir")
    source = tissue_csv or tissue_dir
    if source is None:
        return []
    df = _filter_split(splits.read_tissue_table(source), split if tissue_csv else None, str(source))
    if tissue_csv:
        tables.check_table_files(df, ("image_file_path", "label_file_path"), tissue_csv)
    return [Case(Path(r.image_file_path).stem, r.image_file_path, r.label_file_path) for r in df.itertuples()]


def lesion_cases(lesion_dir: str | None, lesion_csv: str | None, split: str | None) -> list[Case]:
    """Lesion ground truth from a workspace CSV (``--lesion-csv``, ``splits.read_lesion_table``; ``split`` keeps
    one split) or an images/ + masks/ folder (``--lesion-dir``).

    Raises:
        FileNotFoundError, ValueError: as for :func:`tissue_cases`; a folder without images/ and masks/.
    """
    from mammo.data import splits

    if lesion_csv:
        checks.input_file(lesion_csv, "--lesion-csv", "pass the workspace's unified_segmentation_dataset.csv, "
                               "or an images/ + masks/ folder with --lesion-dir")
        df = _filter_split(splits.read_lesion_table(lesion_csv), split, lesion_csv)
        tables.check_table_files(df, ("image_file_path", "roi_mask_file_path"), lesion_csv)
        has_acq = "acquisition" in df.columns
        return [Case(Path(r["image_file_path"]).stem, r["image_file_path"], r["roi_mask_file_path"],
                     acquisition_group(r["image_file_path"], r["acquisition"] if has_acq else ""))
                for _, r in df.iterrows()]
    if not lesion_dir:
        return []
    root = checks.input_folder(lesion_dir, "--lesion-dir", "pass a folder holding images/ and masks/, or the "
                                    "workspace's unified_segmentation_dataset.csv with --lesion-csv")
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


# ----------------------------------------------------------------------------------------------------- patients
def _canonical_patient(value: str) -> str:
    """A patient id as compared by the filters: stripped, and digits without leading zeros ("002" == "2")."""
    value = str(value).strip()
    return str(int(value)) if value.isdigit() else value


def read_patient_list(value: str) -> set[str]:
    """Patient ids from ``--exclude-patients``: a comma-separated list, a text file (one id per line, ``#``
    comments) or a CSV / XLSX table with a ``patient_id`` column (a workspace table: when it has a ``split`` column,
    the ids of its ``train`` rows only, i.e. the patients a model was trained on).

    Returns:
        Canonical ids (see :func:`_canonical_patient`).

    Raises:
        ValueError: a table without a ``patient_id`` column (``tables.TableError``), or no id at all.
    """
    path = Path(value)
    if path.is_file() and path.suffix.lower() in (".csv", ".xlsx", ".xls"):
        table = tables.read_table(path, ("patient_id",), what="patient table",
                                  fix="pass a table with a patient_id column, a text file or a comma-separated list")
        if "split" in table.columns:
            table = table[table["split"] == "train"]
        ids = set(table["patient_id"])
    elif path.is_file():
        lines = (line.split("#", 1)[0] for line in path.read_text(encoding="utf-8").splitlines())
        ids = {part for line in lines for part in line.replace(",", " ").split()}
    else:
        ids = set(value.split(","))
    ids = {_canonical_patient(i) for i in ids if str(i).strip()}
    if not ids:
        raise ValueError(f"--exclude-patients {value}: no patient id found (give ids separated by commas, a text file "
                         "with one id per line, or a table with a patient_id column)")
    return ids


def _case_patients(case: Case) -> set[str]:
    """The ids a case may be listed under: ``splits.patient_id_from_name`` of its file, and for CSAW-S names the
    patient part with and without the ``CSAW_`` prefix of ``sources/csaw_s.py``."""
    from mammo.data import splits

    ids = {splits.patient_id_from_name(case.image_path)}
    if case.patient:
        ids |= {case.patient, f"CSAW_{case.patient}"}
    return {_canonical_patient(i) for i in ids}


def exclude_patients(cases: list[Case], patients: set[str]) -> tuple[list[Case], int]:
    """``cases`` without those of the listed patients (canonical ids, :func:`read_patient_list`); returns the kept
    cases and how many were left out."""
    kept = [c for c in cases if not (_case_patients(c) & patients)]
    return kept, len(cases) - len(kept)


# ------------------------------------------------------------------------------------------------- digital sets
def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".pgm"))


def _layout_images(folder: str, flag: str, advice: str) -> tuple[Path, list[Path]]:
    """The root of an ``images/`` + ``masks/`` folder given as ``flag`` and its images, sorted by name.

    Raises:
        FileNotFoundError: the folder, either sub-folder or any image is missing (the message ends with ``advice``).
    """
    root = checks.input_folder(folder, flag, advice)
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise FileNotFoundError(f"{flag} {root}: expected images/ and masks/ inside it; {advice}")
    images = _image_files(root / "images")
    if not images:
        raise FileNotFoundError(f"{flag} {root}: no images in {root / 'images'}; {advice}")
    return root, images


def density_cases(density_dir: str | None) -> list[Case]:
    """Dense-tissue ground truth of the VinDr layout (``../shared/data/vindr_density_dev``): ``images/<n>.jpg`` with
    ``masks/<n>.<ext>`` (the same stem; JPEG masks are thresholded at > 127 by ``imaging.read_mask``).

    Raises:
        FileNotFoundError, ValueError: not a folder of that layout, no images, or an image without its mask.
    """
    if not density_dir:
        return []
    root, images = _layout_images(density_dir, "--density-dir", "pass a folder of images/<n>.jpg and masks/<n>.jpg "
                                  "dense-tissue masks (../shared/data/vindr_density_dev)")
    masks = {p.stem: p for p in _image_files(root / "masks")}
    missing = [p.name for p in images if p.stem not in masks]
    if missing:
        raise FileNotFoundError(f"--density-dir {root}: no mask masks/<stem>.* for {missing[:5]}; every image needs "
                                "its dense-tissue mask")
    return [Case(p.stem, str(p), str(masks[p.stem])) for p in images]


def csaw_cases(csaw_dir: str | None, patients: str | None = None) -> list[Case]:
    """CSAW-S ground truth (``../shared/data/csaw_s_dev``): ``images/<patient>_<view>.png`` and
    ``masks/<stem>_{cancer,pectoral_muscle,...}.png`` (0/255). ``truth_path`` holds the cancer mask ("" when absent:
    lesion-free), ``pectoral_path`` the pectoral mask ("" when absent: not scored).

    Args:
        patients: comma-separated patient ids to keep (``"002,001"``; leading zeros do not matter); None: all.

    Raises:
        FileNotFoundError, ValueError: not a folder of that layout, no images, or a listed patient not found.
    """
    if not csaw_dir:
        return []
    root, images = _layout_images(csaw_dir, "--csaw-dir", "pass a CSAW-S folder of images/<patient>_<view>.png and "
                                  "masks/<stem>_<label>.png (../shared/data/csaw_s_dev)")
    cases = []
    for image in images:
        found = {name: labels.csaw_mask_path(root / "masks", image.stem, name)
                 for name in ("cancer", "pectoral_muscle")}
        cases.append(Case(image.stem, str(image), str(found["cancer"]) if found["cancer"].is_file() else "",
                          patient=image.stem.split("_")[0],
                          pectoral_path=str(found["pectoral_muscle"]) if found["pectoral_muscle"].is_file() else ""))
    if patients:
        wanted = {_canonical_patient(p) for p in patients.split(",") if p.strip()}
        present = {_canonical_patient(c.patient) for c in cases}
        unknown = sorted(wanted - present)
        if unknown:
            raise ValueError(f"--csaw-patients: no images of patient(s) {unknown} in {root / 'images'}; patients "
                             f"found: {sorted({c.patient for c in cases})}")
        cases = [c for c in cases if _canonical_patient(c.patient) in wanted]
    return cases
