"""CBIS-DDSM: the description CSVs and their DICOM files -> one lesion sample per mammogram.

Dataset quirks handled, and the assumptions made (checked on the four official description CSVs): column names
with spaces (``image file path``) or underscores (``breast_density``) are normalised; path fields may hold
newlines and surrounding whitespace (removed) and backslashes (made ``/``); both by
``mammo.data.tables.read_table``, the suite's one table reader, which also finds ``A.dcm`` for a CSV path
``A.DCM``. Several rows (abnormalities) per image
give one sample with the masks merged by union; with ``--abnormality both`` the mass and calcification folders of
one mammogram (``Mass-Training_P_00001_LEFT_CC`` / ``Calc-Training_P_00001_LEFT_CC``) are one sample too. The
``ROI mask file path`` sometimes names the cropped patch and ``cropped image file path`` the mask, so files are
told apart by content: a mask is binary (two levels, one of them 0) and has the image's aspect ratio within
``--mask-aspect-tolerance`` (relative, default 2 %; the real off-size CBIS masks differ by a few pixels). A
mask of another size with the same aspect ratio is resized with nearest-neighbour interpolation; otherwise the
image is skipped and reported. When any abnormality of an image cannot be used, the whole image is skipped (a
partial mask would teach the network that a marked lesion is background). When a CSV path does not exist as
written (the NBIA download names its folders differently), the files are looked up under the folder named by
the path's first component (``Mass-Training_P_00001_LEFT_CC_1``) anywhere below ``--cbis-dir``. "Test" rows get
split ``test``.

What lives here: :func:`read_cbis_csv` and :func:`find_cbis_csvs` (the description CSVs), :func:`cbis_samples`
(rows grouped by mammogram, files resolved, one :class:`~mammo.prepare.sources.common.Sample` each) and its
helpers (the grouping, the file lookup of ``_CbisResolver``, the mask choice and the build that merges the masks).
"""

from __future__ import annotations

import functools
import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

from mammo import imaging
from mammo.prepare.sources.common import (Built, Report, Sample, SkipSample, fit_mask, is_binary,
                                          normalise_laterality, pick_pathology, safe_name)
from mammo.data.tables import TableError, existing_path, normalise_header, read_table

#: Top folder of a CBIS-DDSM path: ``Mass-Training_P_00001_LEFT_CC`` (``_1``: an abnormality's folder).
_CBIS_FOLDER = re.compile(r"^(?P<abn>Mass|Calc)-(?P<set>Training|Test)_(?P<pid>P_\d+)_(?P<side>LEFT|RIGHT)_"
                          r"(?P<view>CC|MLO)(?:_(?P<n>\d+))?$", re.IGNORECASE)

_SOURCE = "cbis-ddsm"

#: Columns (named as ``tables.normalise_header`` gives them) every CBIS-DDSM description CSV must have.
_CBIS_REQUIRED = ("patient_id", "left_or_right_breast", "image_view", "abnormality_type", "pathology",
                  "image_file_path", "cropped_image_file_path", "roi_mask_file_path")


class _CbisResolver:
    """Finds the files a CBIS-DDSM CSV path names, as written or in the NBIA download's folder layout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._dirs: dict[str, Path] | None = None

    def _index(self) -> dict[str, Path]:
        if self._dirs is None:
            self._dirs = {}
            for dirpath, dirnames, _ in os.walk(self.root):
                dirnames.sort()
                for d in dirnames:
                    if _CBIS_FOLDER.match(d):
                        self._dirs.setdefault(d, Path(dirpath) / d)
        return self._dirs

    def files(self, rel: str) -> list[Path]:
        """Existing files for CSV path ``rel``: the exact file, else every DICOM in its top folder."""
        if not rel:
            return []
        exact = existing_path(self.root / rel)
        if exact.is_file():
            return [exact]
        folder = self._index().get(rel.split("/")[0])
        if folder is None:
            return []
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom"))


#: Cell kinds of the CBIS-DDSM description CSVs (``tables.normalise_cell``); the other columns are plain text.
_CBIS_KINDS = {"image_file_path": "path", "cropped_image_file_path": "path", "roi_mask_file_path": "path",
               "image_view": "view", "abnormality_type": "label", "pathology": "upper"}


def read_cbis_csv(path: Path) -> pd.DataFrame:
    """A CBIS-DDSM description CSV through ``tables.read_table``: column names normalised (``"image file path"`` ->
    ``image_file_path``) and every cell normalised (paths: newlines and surrounding whitespace removed, ``\\`` ->
    ``/``).

    Raises:
        FileNotFoundError: no such file.
        tables.TableError: not a readable CSV, or one of :data:`_CBIS_REQUIRED`'s columns is missing (the message
            names the file and asks for the mass/calc description CSVs).
    """
    fix = "pass the mass/calc *_case_description_*.csv files of CBIS-DDSM"
    df = read_table(path, kinds=_CBIS_KINDS, what="CBIS-DDSM CSV", fix=fix, allow_empty=True)
    missing = [c for c in _CBIS_REQUIRED if c not in df.columns]
    if missing:
        raise TableError(f"{path} is not a CBIS-DDSM description CSV: columns {missing} missing "
                         f"(found {list(df.columns)}); {fix}")
    return df


def find_cbis_csvs(cbis_dir: Path) -> list[Path]:
    """Every CSV below ``cbis_dir`` whose header has an "image file path" column (any spacing / case)."""
    found = []
    for p in sorted(cbis_dir.rglob("*.csv")):
        try:
            with open(p, encoding="utf-8", errors="replace") as fh:
                header = fh.readline()
        except OSError:
            continue
        if "image_file_path" in {normalise_header(c.strip('"')) for c in header.split(",")}:
            found.append(p)
    return found


def _cbis_groups(csv_paths: list[Path], abnormality: str, report: Report) -> dict[tuple, list[dict]]:
    """The rows of every CSV wanted by ``abnormality`` ("mass", "calc" or "both"), grouped by mammogram.

    The key is (subset, patient, side, view) read from the image path's top folder (so the mass and calcification
    rows of one mammogram meet), else from the row's cells plus the image path. A CSV that cannot be read is a
    report error; a row without an image path is reported as skipped.
    """
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for csv_path in csv_paths:
        try:
            df = read_cbis_csv(csv_path)
        except (OSError, ValueError) as exc:
            report.error(str(exc))
            continue
        for idx, r in df.iterrows():
            item = f"{csv_path.name} row {idx + 1}"  # 1-based data row (a row may span lines: quoted newlines)
            abn = str(r["abnormality_type"]).strip().lower()
            if abnormality == "mass" and abn != "mass" or abnormality == "calc" and abn != "calcification":
                continue
            image_rel = r["image_file_path"]
            if not image_rel:
                report.skip(_SOURCE, item, "empty 'image file path'")
                continue
            m = _CBIS_FOLDER.match(image_rel.split("/")[0])
            if m:
                subset = m["set"].capitalize()
                key = (subset, m["pid"].upper(), m["side"].upper(), m["view"].upper())
            else:
                subset = "Test" if "test" in csv_path.name.lower() else "Training"
                key = (subset, str(r["patient_id"]).strip(), str(r["left_or_right_breast"]).strip().upper(),
                       str(r["image_view"]).strip().upper(), image_rel)
            groups[key].append({
                "item": item, "image": image_rel, "roi": r["roi_mask_file_path"],
                "crop": r["cropped_image_file_path"], "abnormality": abn,
                "pathology": str(r["pathology"]).strip().upper(), "patient_id": str(r["patient_id"]).strip(),
                "side": str(r["left_or_right_breast"]).strip(), "view": str(r["image_view"]).strip().upper(),
                "abnormality_id": str(r.get("abnormality_id", "")).strip()})
    return groups


#: Per CSV row of one mammogram, the files that may hold its mask, as (file, "roi" | "crop").
_Candidates = list[tuple[dict, list[tuple[Path, str]]]]


def _image_files(resolver: _CbisResolver, rows: list[dict]) -> list[Path]:
    """The files of the first row whose image path resolves (empty when none does)."""
    for d in rows:
        image_files = resolver.files(d["image"])
        if image_files:
            return image_files
    return []


def _mask_candidates(resolver: _CbisResolver, rows: list[dict]) -> tuple[_Candidates, list[str]]:
    """Per row, the files that may hold its mask as (file, "roi" | "crop"): the ROI-mask path first, then the
    cropped-image path (the two are sometimes swapped), then whatever else the abnormality's folder holds; and one
    message per row without any file."""
    candidates = []
    missing = []
    for d in rows:
        files: list[tuple[Path, str]] = []
        for field_name in ("roi", "crop"):
            for f in resolver.files(d[field_name]):
                if f not in [x for x, _ in files]:
                    files.append((f, field_name))
        if not files:
            missing.append(f"{d['item']}: neither the ROI mask {d['roi']!r} nor the cropped image "
                           f"{d['crop']!r} exists")
        candidates.append((d, files))
    return candidates, missing


def _choose_mask(d: dict, files: list[tuple[Path, str]], shape: tuple[int, ...],
                 tolerance: float) -> tuple[np.ndarray, str, str | None]:
    """The first binary file of ``files`` that fits the image (``common.fit_mask``): (bool mask of ``shape``, the
    field it came from, the fitting note or None).

    Raises:
        SkipSample: no file is a usable mask (each refused file and why in the message).
    """
    rejected = []
    for f, field_name in files:
        px = imaging.read_image(f).pixels
        if not is_binary(px):
            rejected.append(f"{f.name} ({field_name} path) is a grey-level image (the cropped patch)")
            continue
        try:
            mask, note = fit_mask(px, shape, tolerance, f"{d['item']} {f.name}")
        except SkipSample as exc:
            rejected.append(str(exc))
            continue
        return mask, field_name, note
    raise SkipSample(f"abnormality {d['item']}: no usable ROI mask: " + "; ".join(rejected))


def _build_cbis(image_file: Path, candidates: _Candidates, tolerance: float) -> Built:
    """Read one mammogram and merge (union) the masks of its abnormalities.

    Raises:
        SkipSample: an abnormality has no usable mask, or an empty one.
    """
    img = imaging.read_image(image_file)
    shape = img.pixels.shape
    merged = np.zeros(shape, bool)
    notes: list[str] = []
    for d, files in candidates:
        mask, field_name, note = _choose_mask(d, files, shape, tolerance)
        if field_name == "crop":
            notes.append(f"{d['item']}: ROI mask and cropped-image paths swapped in the CSV; the binary "
                         "file was used as the mask")
        if note:
            notes.append(note)
        if not mask.any():
            raise SkipSample(f"abnormality {d['item']}: the ROI mask is empty (all zero)")
        merged |= mask
    return Built(image=img.pixels, label=merged, notes=notes, n_masks=len(candidates))


def _cbis_row(key: tuple, rows: list[dict]) -> dict:
    """The CSV metadata of one mammogram's sample (its group ``key`` and rows, see :func:`_cbis_groups`)."""
    return {"patient_id": key[1] if len(key) == 4 else rows[0]["patient_id"],
            "laterality": normalise_laterality(key[2]), "view": key[3],
            "pathology": pick_pathology(d["pathology"] for d in rows),
            "abnormality": ";".join(sorted({d["abnormality"] for d in rows})), "acquisition": "",
            "augmentation": "", "split": "test" if key[0] == "Test" else "", "original_name": rows[0]["image"]}


def cbis_samples(cbis_dir: Path, csv_paths: list[Path], abnormality: str, tolerance: float,
                 report: Report) -> list[Sample]:
    """One lesion sample per CBIS-DDSM mammogram, its abnormalities' masks merged (see the module docstring).

    Args:
        cbis_dir: the image root the CSVs' paths are relative to.
        csv_paths: description CSVs (a CSV that cannot be read is a report error).
        abnormality: "mass", "calc" or "both".
        tolerance: relative aspect-ratio difference within which a mask of another size is resized.
        report: receives the images skipped (not found, ambiguous, no mask file) and the errors.
    """
    resolver = _CbisResolver(cbis_dir)
    groups = _cbis_groups(csv_paths, abnormality, report)
    samples: list[Sample] = []
    for key in sorted(groups):
        rows = sorted(groups[key], key=lambda d: (d["image"], d["abnormality"], d["abnormality_id"], d["item"]))
        items = ", ".join(d["item"] for d in rows)
        image_files = _image_files(resolver, rows)
        if not image_files:
            report.skip(_SOURCE, rows[0]["image"], f"image file not found below {cbis_dir} (CSV rows {items})")
            continue
        if len(image_files) > 1:
            report.skip(_SOURCE, rows[0]["image"], f"ambiguous: {len(image_files)} DICOM files in the image's "
                                                   f"folder {image_files[0].parent} (CSV rows {items})")
            continue
        candidates, missing = _mask_candidates(resolver, rows)
        if missing:
            report.skip(_SOURCE, rows[0]["image"], "; ".join(missing))
            continue
        inputs = [image_files[0]] + [f for _, files in candidates for f, _ in files]
        build = functools.partial(_build_cbis, image_files[0], candidates, tolerance)
        samples.append(Sample("lesion", _SOURCE, safe_name("_".join(key[:4])), rows[0]["image"], _cbis_row(key, rows),
                              inputs, build, params=f"tol={tolerance}"))
    return samples
