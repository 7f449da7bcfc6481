"""Turn public mammography dataset downloads into one training workspace, and say what could not be used.

Sources (any combination):

- CBIS-DDSM (``--cbis-dir`` + its description CSVs ``--cbis-csv``, or a zip): DICOM full mammograms, the
  cropped patches and the ROI masks named in the CSVs.
- Mini-DDSM (``--mini-ddsm-dir`` with ``DataWMask.xlsx``, and the "Data-MoreThanTwoMasks" part, or zips).
- The DDSM tissue-label set of Tiryaki & Kaplanoglu (``--tissue-dir`` with the ``fgt_seg`` / ``fgt_seg_labels``
  layout, a zip, or ``--tissue-url``).
- Any ``images/`` + ``masks/`` pair folder (``--lesion-dir``), e.g. the CDD-CESM files in ``../shared/data``.
- ``--synthetic N``: a small procedural set (``synthetic.py``) for smoke tests; never a stand-in for real data.

Workspace written (``--workspace``; every path in the CSVs is relative to the workspace, so it can be moved):

- ``tissue/<source>/images/<name>.png`` + ``tissue/<source>/labels/<name>_LI.png`` (DDSM encoding kept:
  64 background, 128 adipose, 192 FGT, 255 pectoral) and ``tissue_dataset.csv`` (columns
  :data:`TISSUE_COLUMNS`).
- ``lesion/<source>/images/<name>.png`` + ``lesion/<source>/masks/<name>_mask.png`` (one 0/255 mask per image,
  all its lesions merged; no mask file and an empty ``roi_mask_file_path`` for a lesion-free image) and
  ``unified_segmentation_dataset.csv`` (columns :data:`LESION_COLUMNS`). Laterality is ``L``/``R``, view ``CC``/
  ``MLO``; ``acquisition`` is ``DM``/``CM`` for CDD-CESM (low-energy vs contrast-enhanced: report them apart),
  ``augmentation`` is ``flipped``/``mirrored`` for CDD-CESM's augmented copies.
- ``prepare_report.json``: counts per source and split, every skipped row with its reason, notes (swapped
  crop/mask paths, resized masks), elapsed time. ``--archive`` zips the finished workspace.
- The CSVs list the samples of the latest run: pass every source in one run (finished images are reused).
- Caches that training never reads: ``_extracted/`` (zips extracted once, checked against the zip's size and
  mtime), ``_downloads/`` and ``.prepare_manifest.json`` (what each output was made from).

Images are converted to PNG with the suite's one reader (``imaging.read_image``: 16-bit stays 16-bit, DICOM
decoded with its LUTs). Splits are patient-level (``datasets.split_by_patient``, ``--val-fraction``, ``--seed``);
CBIS-DDSM "Test" rows and tissue images under a ``test`` folder get split ``test``.

Safety and resumability: inputs are only read (the workspace may not lie inside an input folder); every output
is written to a temporary file and moved into place (``os.replace``); the manifest records, for each output, the
size and mtime of the files it was made from, so a re-run skips finished work and an interrupted run leaves
nothing that a later run would trust. CSV rows are sorted and hold no timestamps: two runs give identical CSVs.

Dataset quirks handled, and the assumptions made:

- CBIS-DDSM (checked on the four official description CSVs): column names with spaces (``image file path``) or
  underscores (``breast_density``) are normalised; path fields may hold newlines and surrounding whitespace
  (removed) and backslashes (made ``/``). Several rows (abnormalities) per image give one sample with the masks
  merged by union; with ``--abnormality both`` the mass and calcification folders of one mammogram
  (``Mass-Training_P_00001_LEFT_CC`` / ``Calc-Training_P_00001_LEFT_CC``) are one sample too. The
  ``ROI mask file path`` sometimes names the cropped patch and ``cropped image file path`` the mask, so files are
  told apart by content: a mask is binary (two levels, one of them 0) and has the image's aspect ratio within
  ``--mask-aspect-tolerance`` (relative, default 2 %; the real off-size CBIS masks differ by a few pixels). A
  mask of another size with the same aspect ratio is resized with nearest-neighbour interpolation; otherwise the
  image is skipped and reported. When any abnormality of an image cannot be used, the whole image is skipped (a
  partial mask would teach the network that a marked lesion is background). When a CSV path does not exist as
  written (the NBIA download names its folders differently), the files are looked up under the folder named by
  the path's first component (``Mass-Training_P_00001_LEFT_CC_1``) anywhere below ``--cbis-dir``.
- Mini-DDSM (Kaggle release; columns ``fullPath``, ``fileName``, ``View``, ``Side``, ``Status``
  (Normal/Benign/Cancer), ``Tumour_Contour``, ``Tumour_Contour2`` [, ``Tumour_Contour3`` ... in
  Data-MoreThanTwoMasks], ``Age``, ``Density``): paths use backslashes (made ``/``) and are resolved relative to
  the spreadsheet's folder, then to the ``--mini-ddsm-dir``, then by file name anywhere below it; ``-`` or an
  empty cell means "no contour"; every ``Tumour_Contour*`` column is merged. Assumed (not verifiable offline):
  the first sheet holds the table, ``fileName`` looks like ``A_0002_1.LEFT_CC.png`` (patient = ``A_0002``), and
  an image listed in both tables keeps the entry with more contours. Images without a contour (Normal cases and
  the unmarked side of a Benign/Cancer case: DDSM outlines every abnormality it records) are kept as lesion-free
  samples (pathology ``NORMAL``) only with ``--include-normals``.
- Tissue set: ``<name>.png`` pairs with ``<name>_LI.png``; a label with values other than 64/128/192/255 or a
  size different from its image is skipped and reported. ``A_0002_1.RIGHT_MLO`` gives patient ``A_0002``.
- Zips (``--zips-dir``) are recognised by name: "morethantwomasks" -> Mini-DDSM part 2, "mini" -> Mini-DDSM,
  "cbis" or "ddsm" -> CBIS-DDSM, "fgt" / "tissue" / "mammogram-segmentation" -> tissue set; ``--cbis-zip``,
  ``--mini1-zip``, ``--mini2-zip``, ``--tissue-zip`` override. Members with absolute paths or ``..`` are refused.

Example::

    python prepare_to_train.py --tissue-dir ../shared/data/tissue/train_valid \\
        --lesion-dir ../shared/data/lesion_cdd_cesm --workspace workspace
    python prepare_to_train.py --synthetic 16 --workspace workspace_synthetic
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

import datasets
import imaging
import synthetic
from fileio import atomic_write_bytes, atomic_writer

#: Bump when the outputs made from the same inputs change; part of every cache key in the manifest.
PREPARER_VERSION = 1

#: Columns of ``tissue_dataset.csv`` (the first five are the suite's contract).
TISSUE_COLUMNS = ["image_file_path", "label_file_path", "patient_id", "source", "split",
                  "laterality", "view", "original_name"]

#: Columns of ``unified_segmentation_dataset.csv`` (the first eight are the suite's contract).
LESION_COLUMNS = ["image_file_path", "roi_mask_file_path", "patient_id", "source", "laterality", "view",
                  "pathology", "split", "abnormality", "acquisition", "augmentation", "n_masks",
                  "height", "width", "bit_depth", "original_name"]

#: DDSM tissue-label intensities (dataset readme of tiryakiv/Mammogram-segmentation; ../shared/data/README.md).
TISSUE_LABEL_INTENSITIES = (64, 128, 192, 255)

#: Public repository archive of the DDSM tissue-label set (Tiryaki & Kaplanoglu, IRBM 2022); GitHub serves the
#: default branch at ``archive/HEAD.zip``. Not contacted unless ``--tissue-url`` is given.
DEFAULT_TISSUE_URL = "https://github.com/tiryakiv/Mammogram-segmentation/archive/HEAD.zip"

#: Relative aspect-ratio difference under which a differently sized mask is resized (nearest) onto its image.
DEFAULT_MASK_ASPECT_TOLERANCE = 0.02

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".dcm", ".dicom")

#: Severity order used to give an image with several abnormalities one pathology (most severe wins).
_PATHOLOGY_ORDER = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK", "NORMAL", "")

_CBIS_FOLDER = re.compile(r"^(?P<abn>Mass|Calc)-(?P<set>Training|Test)_(?P<pid>P_\d+)_(?P<side>LEFT|RIGHT)_"
                          r"(?P<view>CC|MLO)(?:_(?P<n>\d+))?$", re.IGNORECASE)
_CDD_NAME = re.compile(r"^(?:(?P<aug>flipped|mirrored)_)?(?P<pid>P\d+)_(?P<lat>[LR])_(?P<acq>DM|CM)_"
                       r"(?P<view>CC|MLO)$", re.IGNORECASE)
_DDSM_NAME = re.compile(r"^(?P<pid>[A-Z]_\d{4})_\d+\.(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)$", re.IGNORECASE)
_LAT_TOKEN = re.compile(r"(?:^|[_\-. ])(?P<lat>L|R|LEFT|RIGHT)(?=$|[_\-. ])", re.IGNORECASE)
_VIEW_TOKEN = re.compile(r"(?:^|[_\-. ])(?P<view>CC|MLO|ML|LM|XCCL|XCCM)(?=$|[_\-. ])", re.IGNORECASE)


class SkipSample(Exception):
    """One input item cannot be used; the message is the reason written to the report."""


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the preparer (see the module docstring for what each source expects)."""
    parser = argparse.ArgumentParser(description="Prepare a training workspace from mammography datasets.",
                                     add_help=add_help)
    # downloaded zips
    parser.add_argument("--zips-dir", type=Path, default=None,
                        help="folder holding downloaded dataset zips, recognised by name: 'morethantwomasks', 'mini', "
                             "'cbis'/'ddsm', 'fgt'/'tissue' (default: none)")
    parser.add_argument("--cbis-zip", type=Path, default=None, help="CBIS-DDSM zip (overrides --zips-dir)")
    parser.add_argument("--mini1-zip", type=Path, default=None, help="Mini-DDSM zip (overrides --zips-dir)")
    parser.add_argument("--mini2-zip", type=Path, default=None,
                        help="Mini-DDSM Data-MoreThanTwoMasks zip (overrides --zips-dir)")
    parser.add_argument("--tissue-zip", type=Path, default=None, help="tissue-label set zip (overrides --zips-dir)")
    parser.add_argument("--tissue-url", nargs="?", const=DEFAULT_TISSUE_URL, default=None,
                        help=f"download the tissue-label repository archive (needs a network; default URL "
                             f"{DEFAULT_TISSUE_URL})")
    # extracted folders
    parser.add_argument("--cbis-dir", type=Path, default=None,
                        help="CBIS-DDSM image root; the CSVs' paths are relative to it (default: none)")
    parser.add_argument("--cbis-csv", type=Path, action="append", default=None,
                        help="CBIS-DDSM description CSV (repeatable; relative names are also looked up in "
                             "--cbis-dir; default: every *.csv with an 'image file path' column in --cbis-dir)")
    parser.add_argument("--mini-ddsm-dir", type=Path, action="append", default=None,
                        help="Mini-DDSM folder holding DataWMask.xlsx and/or the Data-MoreThanTwoMasks table "
                             "(repeatable)")
    parser.add_argument("--tissue-dir", type=Path, action="append", default=None,
                        help="tissue-label folder with fgt_seg/ and fgt_seg_labels/ (repeatable)")
    parser.add_argument("--lesion-dir", type=Path, action="append", default=None,
                        help="folder with images/ and masks/ of the same stems, e.g. CDD-CESM (repeatable; pairs under "
                             "a 'test' sub-folder get split test)")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="also write N procedural tissue + lesion samples (smoke tests; default: %(default)s)")
    # selection and quirks
    parser.add_argument("--abnormality", choices=("mass", "calc", "both"), default="both",
                        help="CBIS-DDSM abnormality types to keep (default: %(default)s)")
    parser.add_argument("--include-normals", action="store_true",
                        help="keep Mini-DDSM images without a tumour contour as lesion-free samples (default: off)")
    parser.add_argument("--mask-aspect-tolerance", type=float, default=DEFAULT_MASK_ASPECT_TOLERANCE,
                        help="largest relative aspect-ratio difference for which a mask of another size is "
                             "resized onto its image (nearest); above it the image is skipped "
                             "(default: %(default)s)")
    # output
    parser.add_argument("--workspace", type=Path, default=Path("workspace"),
                        help="output folder (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.2,
                        help="wanted fraction of the (non-test) images in validation; whole patients are moved "
                             "(datasets.split_by_patient) (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the patient split and of --synthetic "
                                                             "(default: %(default)s)")
    parser.add_argument("--archive", nargs="?", const="auto", default=None, metavar="ZIP",
                        help="zip the finished workspace (without caches) to ZIP (default when given without a "
                             "value: <workspace>.zip beside the workspace)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace workspace tables that hold other rows (a re-run with the same sources needs "
                             "no flag: it writes identical tables)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def _norm_column(name: object) -> str:
    """``"ROI mask file path "`` -> ``"roi_mask_file_path"``; ``"breast_density"`` stays."""
    return re.sub(r"[\s_]+", "_", str(name).strip().lower())


def clean_path_field(value: object) -> str:
    """Clean a path cell of a dataset table: newlines/tabs removed, whitespace stripped, ``\\`` -> ``/``.

    Returns ``""`` for an empty cell, NaN, or the Mini-DDSM "no contour" marker ``-``.
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    text = re.sub(r"[\r\n\t]+", "", str(value)).strip().replace("\\", "/")
    if text in ("-", "nan", "NaN", "None"):
        return ""
    while text.startswith("./"):
        text = text[2:]
    return text


def normalise_laterality(value: object) -> str:
    """``"LEFT"``/``"l"``/``"L"`` -> ``"L"``, right likewise; anything else -> ``""``."""
    text = str(value or "").strip().upper()
    return {"L": "L", "LEFT": "L", "R": "R", "RIGHT": "R"}.get(text, "")


def parse_image_name(stem: str) -> dict:
    """Metadata from a file stem.

    Handles CDD-CESM names (``[flipped_|mirrored_]P<patient>_<L|R>_<DM|CM>_<CC|MLO>``), DDSM case names
    (``A_0002_1.RIGHT_MLO``: patient ``A_0002``) and, for other names, laterality / view tokens between
    ``_ - .`` separators with ``datasets.patient_id_from_name`` for the patient.

    Returns:
        dict with ``patient_id``, ``laterality`` ("L"/"R"/""), ``view``, ``acquisition`` ("DM"/"CM"/""),
        ``augmentation`` ("flipped"/"mirrored"/"") and ``dataset`` ("cdd-cesm", "ddsm" or "").
    """
    m = _CDD_NAME.match(stem)
    if m:
        return {"patient_id": m["pid"].upper(), "laterality": m["lat"].upper(), "view": m["view"].upper(),
                "acquisition": m["acq"].upper(), "augmentation": (m["aug"] or "").lower(), "dataset": "cdd-cesm"}
    m = _DDSM_NAME.match(stem)
    if m:
        return {"patient_id": m["pid"].upper(), "laterality": normalise_laterality(m["side"]),
                "view": m["view"].upper(), "acquisition": "", "augmentation": "", "dataset": "ddsm"}
    lat = _LAT_TOKEN.search(stem)
    view = _VIEW_TOKEN.search(stem)
    return {"patient_id": str(datasets.patient_id_from_name(stem)),
            "laterality": normalise_laterality(lat["lat"]) if lat else "",
            "view": view["view"].upper() if view else "", "acquisition": "", "augmentation": "", "dataset": ""}


def _safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (path separators and control characters replaced by ``_``)."""
    return re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", text).strip(" .") or "unnamed"


def _is_binary(pixels: np.ndarray) -> bool:
    """True when ``pixels`` hold at most two levels and one of them is 0 (an all-zero array counts)."""
    top = pixels.max()
    return bool(np.count_nonzero((pixels != 0) & (pixels != top)) == 0)


def fit_mask(mask: np.ndarray, image_shape: tuple[int, int], tolerance: float, what: str) -> tuple[np.ndarray, str]:
    """Bring a binary mask onto its image's pixel grid.

    Args:
        mask: (h, w) array, nonzero = lesion.
        image_shape: (H, W) of the image.
        tolerance: largest relative aspect-ratio difference ``|h/w - H/W| / (H/W)`` accepted for a resize.
        what: name of the mask for messages.

    Returns:
        ((H, W) bool mask, note) where note is "" or says that the mask was resized.

    Raises:
        SkipSample: the aspect ratios differ by more than ``tolerance``.
    """
    (h, w), (big_h, big_w) = mask.shape[:2], image_shape
    if (h, w) == (big_h, big_w):
        return mask > 0, ""
    ratio_img, ratio_mask = big_h / big_w, h / w
    diff = abs(ratio_mask - ratio_img) / ratio_img
    if diff > tolerance:
        raise SkipSample(f"mask {what} is {w}x{h} (WxH) but the image is {big_w}x{big_h}: aspect ratios differ by "
                         f"{diff:.1%} > tolerance {tolerance:.1%} (--mask-aspect-tolerance); not resized")
    resized = cv2.resize((mask > 0).astype(np.uint8), (big_w, big_h), interpolation=cv2.INTER_NEAREST)
    return resized > 0, f"mask {what} resized from {w}x{h} to {big_w}x{big_h} (nearest)"


def _pick_pathology(values: Iterable[str]) -> str:
    vals = {str(v).strip().upper() for v in values}
    for p in _PATHOLOGY_ORDER:
        if p in vals:
            return p
    return sorted(vals)[0] if vals else ""


# ----------------------------------------------------------------------------------------------------------------
# Samples and their cache
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Built:
    """What a sample's build step returns.

    Attributes:
        image: (H, W) uint8/uint16 pixels to write as PNG.
        label: tissue: (H, W) uint8 DDSM-encoded label; lesion: (H, W) bool/uint8 mask (nonzero = lesion), or
            None for a lesion-free image.
        notes: remarks for the report (resized masks, swapped paths).
        n_masks: number of source masks merged (lesion samples).
    """

    image: np.ndarray
    label: np.ndarray | None
    notes: list[str] = field(default_factory=list)
    n_masks: int = 0


@dataclass
class Sample:
    """One output sample: its metadata, the files it is made from, and how to make it.

    Attributes:
        kind: "tissue" or "lesion".
        source: source name ("cbis-ddsm", "mini-ddsm", "cdd-cesm", "ddsm_tissue", "synthetic", ...).
        name: output file stem (unique within the source).
        item: what the report calls the input (a CSV path, a file name).
        row: CSV metadata (patient_id, laterality, view, pathology, split, ...), without file paths.
        inputs: files read by ``build``; their size and mtime form the cache key.
        build: reads the inputs and returns a :class:`Built` (raises SkipSample / ImageReadError / ValueError).
        params: extra cache-key text (options that change the output).
    """

    kind: str
    source: str
    name: str
    item: str
    row: dict
    inputs: list[Path]
    build: Callable[[], Built]
    params: str = ""

    def outputs(self) -> tuple[str, str]:
        base = f"{self.kind}/{_safe_name(self.source)}"
        if self.kind == "tissue":
            return f"{base}/images/{self.name}.png", f"{base}/labels/{self.name}_LI.png"
        return f"{base}/images/{self.name}.png", f"{base}/masks/{self.name}_mask.png"

    def fingerprint(self) -> str:
        parts = [PREPARER_VERSION, self.kind, self.params]
        for p in self.inputs:
            st = p.stat()
            parts.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
        return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()


class Report:
    """Collects counts, skipped items and notes; written as ``prepare_report.json``."""

    def __init__(self) -> None:
        self.skipped: list[dict] = []
        self.notes: list[dict] = []
        self.errors: list[str] = []
        self.reused = 0
        self.written = 0

    def skip(self, source: str, item: str, reason: str) -> None:
        self.skipped.append({"source": source, "item": item, "reason": reason})

    def note(self, source: str, item: str, note: str) -> None:
        self.notes.append({"source": source, "item": item, "note": note})

    def error(self, message: str) -> None:
        print(f"error: {message}", file=sys.stderr)
        self.errors.append(message)


class Manifest:
    """``.prepare_manifest.json``: for each output image, the cache key and what was written."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                if data.get("version") == PREPARER_VERSION:
                    self.entries = dict(data.get("entries", {}))
            except (OSError, ValueError) as exc:
                print(f"warning: ignoring unreadable manifest {path} ({exc}); everything will be rebuilt",
                      file=sys.stderr)

    def save(self) -> None:
        data = {"version": PREPARER_VERSION, "entries": {k: self.entries[k] for k in sorted(self.entries)}}
        atomic_write_bytes(self.path, json.dumps(data, indent=1).encode("utf-8"))


def process_samples(samples: list[Sample], workspace: Path, manifest: Manifest, report: Report,
                    desc: str) -> list[dict]:
    """Write (or reuse) every sample's PNGs and return the CSV rows of those that succeeded.

    A sample whose manifest entry has the same cache key and whose outputs exist is not rebuilt. A sample that
    fails (SkipSample, ImageReadError, ValueError, OSError) is reported and left out; the rest go on.
    """
    rows: list[dict] = []
    for sample in tqdm(samples, desc=desc, unit="image", disable=None):
        image_rel, label_rel = sample.outputs()
        try:
            key = sample.fingerprint()
        except OSError as exc:
            report.skip(sample.source, sample.item, f"input file vanished: {exc}")
            continue
        entry = manifest.entries.get(image_rel)
        if not (entry and entry.get("fingerprint") == key
                and all((workspace / o).is_file() for o in entry.get("outputs", []))):
            try:
                built = sample.build()
            except (SkipSample, imaging.ImageReadError, ValueError, OSError) as exc:
                report.skip(sample.source, sample.item, str(exc))
                manifest.entries.pop(image_rel, None)
                continue
            outputs = [image_rel]
            imaging.write_png(workspace / image_rel, built.image)
            if built.label is not None:
                label = built.label
                if sample.kind == "lesion":
                    label = np.where(np.asarray(label) > 0, 255, 0).astype(np.uint8)
                imaging.write_png(workspace / label_rel, label)
                outputs.append(label_rel)
            entry = {"fingerprint": key, "outputs": outputs, "height": int(built.image.shape[0]),
                     "width": int(built.image.shape[1]), "bit_depth": 8 if built.image.dtype == np.uint8 else 16,
                     "notes": list(built.notes), "n_masks": int(built.n_masks)}
            manifest.entries[image_rel] = entry
            report.written += 1
            if report.written % 25 == 0:
                manifest.save()
        else:
            report.reused += 1
        for note in entry.get("notes", []):
            report.note(sample.source, sample.item, note)
        row = dict(sample.row)
        row["source"] = sample.source
        if sample.kind == "tissue":
            row.update(image_file_path=image_rel, label_file_path=label_rel)
        else:
            has_mask = label_rel in entry["outputs"]
            row.update(image_file_path=image_rel, roi_mask_file_path=label_rel if has_mask else "",
                       height=entry["height"], width=entry["width"], bit_depth=entry["bit_depth"],
                       n_masks=entry.get("n_masks", 0))
            if not has_mask:
                row["pathology"] = row.get("pathology") or "NORMAL"
        rows.append(row)
    manifest.save()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Zips and downloads
# ----------------------------------------------------------------------------------------------------------------
def classify_zip(name: str) -> str | None:
    """Dataset kind of a downloaded zip from its file name, as users name them.

    Returns "mini2" (Mini-DDSM Data-MoreThanTwoMasks), "mini1" (Mini-DDSM), "cbis" (CBIS-DDSM), "tissue" (the
    DDSM tissue-label repository) or None when the name says nothing.
    """
    low = re.sub(r"[\s_\-.]+", "", name.lower())
    if "morethantwo" in low or "mini2" in low or "miniddsm2" in low:
        return "mini2"
    if "mini" in low:
        return "mini1"
    if "cbis" in low or "ddsm" in low:
        return "cbis"
    if "fgt" in low or "tissue" in low or "mammogramsegmentation" in low:
        return "tissue"
    return None


def extract_zip(zip_path: Path, cache_root: Path, kind: str, report: Report) -> Path:
    """Extract ``zip_path`` once into ``cache_root/<kind>-<stem>/`` and return that folder.

    The folder carries ``.extracted.json`` (zip path, size, mtime); when it matches, nothing is extracted again.
    Extraction goes to a temporary folder that is renamed when complete, so an interrupted extraction is never
    trusted. Members with absolute paths or ``..`` components are refused and reported.

    Raises:
        zipfile.BadZipFile: not a zip file. OSError: cannot read it or write the cache.
    """
    zip_path = zip_path.resolve()
    st = zip_path.stat()
    stamp = {"zip": str(zip_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": PREPARER_VERSION}
    dest = cache_root / f"{kind}-{_safe_name(zip_path.stem)}"
    marker = dest / ".extracted.json"
    if marker.is_file():
        try:
            if json.loads(marker.read_text(encoding="utf-8")) == stamp:
                return dest
        except (OSError, ValueError):
            pass
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=cache_root))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            for info in tqdm(members, desc=f"unzip {zip_path.name}", unit="file", disable=None):
                parts = Path(info.filename.replace("\\", "/")).parts
                if info.filename.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", info.filename):
                    report.skip(kind, f"{zip_path.name}:{info.filename}", "unsafe path in zip (absolute or '..'); "
                                                                          "not extracted")
                    continue
                zf.extract(info, tmp)
        (tmp / ".extracted.json").write_text(json.dumps(stamp), encoding="utf-8")
        if dest.exists():
            shutil.rmtree(dest)  # our own stale cache of an older zip
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def download(url: str, downloads: Path, timeout_s: float = 30.0) -> Path:
    """Download ``url`` once into ``downloads/`` (atomically) and return the file.

    Raises:
        RuntimeError: the download failed (offline, unreachable, HTTP error); the message names ``--tissue-dir``.
    """
    target = downloads / f"tissue-{hashlib.sha256(url.encode('utf-8')).hexdigest()[:12]}.zip"
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_writer(target) as fh, urllib.request.urlopen(url, timeout=timeout_s) as resp:
            shutil.copyfileobj(resp, fh, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RuntimeError(
            f"could not download the tissue-label archive from {url} ({exc}). This machine may be offline. "
            "Download the repository archive elsewhere (github.com/tiryakiv/Mammogram-segmentation), extract it "
            "and pass the folder holding fgt_seg/ and fgt_seg_labels/ with --tissue-dir (or put the zip in "
            "--zips-dir / give it with --tissue-zip).") from exc
    return target


# ----------------------------------------------------------------------------------------------------------------
# Tissue set
# ----------------------------------------------------------------------------------------------------------------
def _find_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def tissue_samples(root: Path, source: str, report: Report) -> list[Sample]:
    """Samples of a tissue-label folder: every ``fgt_seg/<name>`` with ``fgt_seg_labels/<name>_LI`` below ``root``.

    Images under a folder named ``test`` (below ``root``) get split "test".
    """
    samples: list[Sample] = []
    seg_dirs = sorted(d for d in [root, *root.rglob("fgt_seg")] if d.name == "fgt_seg" and d.is_dir()
                      and (d.parent / "fgt_seg_labels").is_dir())
    if not seg_dirs:
        report.error(f"tissue folder {root}: no fgt_seg/ with a sibling fgt_seg_labels/ found below it "
                     "(expected the layout of tiryakiv/Mammogram-segmentation segmentation_data/...)")
        return samples
    for seg in seg_dirs:
        labels = _find_by_stem(seg.parent / "fgt_seg_labels")
        is_test = "test" in [p.lower() for p in seg.relative_to(root).parts] if seg != root else False
        for stem, image_path in _find_by_stem(seg).items():
            label_path = labels.get(f"{stem}_LI")
            item = str(image_path.relative_to(root))
            if label_path is None:
                report.skip(source, item, f"no label file {stem}_LI.* in {seg.parent / 'fgt_seg_labels'}")
                continue
            meta = parse_image_name(stem)
            row = {"patient_id": meta["patient_id"], "laterality": meta["laterality"], "view": meta["view"],
                   "split": "test" if is_test else "", "original_name": item}

            def build(image_path=image_path, label_path=label_path) -> Built:
                img = imaging.read_image(image_path)
                lab = imaging.read_image(label_path).pixels
                if lab.dtype != np.uint8:
                    raise SkipSample(f"label {label_path.name} is 16-bit; expected 8-bit 64/128/192/255")
                stray = np.setdiff1d(np.unique(lab), TISSUE_LABEL_INTENSITIES)
                if stray.size:
                    raise SkipSample(f"label {label_path.name} holds values {stray[:10].tolist()} besides "
                                     f"{list(TISSUE_LABEL_INTENSITIES)} (saved as JPEG or resized with "
                                     "interpolation?)")
                if lab.shape != img.pixels.shape:
                    raise SkipSample(f"label {label_path.name} is {lab.shape[1]}x{lab.shape[0]} but the image is "
                                     f"{img.pixels.shape[1]}x{img.pixels.shape[0]} (WxH)")
                return Built(image=img.pixels, label=lab)

            samples.append(Sample("tissue", source, _safe_name(stem), item, row, [image_path, label_path], build))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# images/ + masks/ pair folders (CDD-CESM and others)
# ----------------------------------------------------------------------------------------------------------------
def lesion_dir_samples(root: Path, report: Report, tolerance: float) -> list[Sample]:
    """Samples of every ``images/`` + ``masks/`` pair folder at or below ``root``.

    A mask belongs to an image when its stem equals the image's stem, or (when there is no such mask) starts with
    the image's stem + ``_`` (``0_R-CC_benign.png``; a ``benign`` / ``malignant`` suffix gives the pathology).
    JPEG masks are thresholded at > 127 (``imaging.read_mask``). An image without a mask is reported and
    skipped; a mask that is all zero makes a lesion-free sample. The source is "cdd-cesm" when the names
    follow CDD-CESM's pattern, else the name of ``root``. Pairs under a sub-folder named ``test`` get split
    "test".
    """
    samples: list[Sample] = []
    pairs = sorted(d for d in [root, *root.rglob("*")] if d.is_dir() and (d / "images").is_dir()
                   and (d / "masks").is_dir())
    if not pairs:
        report.error(f"lesion folder {root}: no images/ + masks/ sub-folders found")
        return samples
    for folder in pairs:
        images = _find_by_stem(folder / "images")
        masks = _find_by_stem(folder / "masks")
        cdd = sum(bool(_CDD_NAME.match(s)) for s in images)
        source = "cdd-cesm" if images and cdd >= len(images) / 2 else _safe_name(root.resolve().name.lower())
        is_test = folder != root and "test" in [p.lower() for p in folder.relative_to(root).parts]
        for stem, image_path in images.items():
            item = str(image_path.relative_to(root))
            mask_paths = [masks[stem]] if stem in masks else [
                m for s, m in masks.items() if s.startswith(stem + "_") and s not in images]
            if not mask_paths:
                report.skip(source, item, f"no mask {stem}.* (or {stem}_*.*) in {folder / 'masks'}")
                continue
            meta = parse_image_name(stem)
            suffixes = {m.stem[len(stem):].lower() for m in mask_paths}
            pathology = ("MALIGNANT" if any("malignant" in s for s in suffixes) else
                         "BENIGN" if any("benign" in s for s in suffixes) else "")
            row = {"patient_id": meta["patient_id"], "laterality": meta["laterality"], "view": meta["view"],
                   "acquisition": meta["acquisition"], "augmentation": meta["augmentation"],
                   "pathology": pathology, "abnormality": "", "split": "test" if is_test else "",
                   "original_name": item}

            def build(image_path=image_path, mask_paths=mask_paths) -> Built:
                img = imaging.read_image(image_path)
                merged = np.zeros(img.pixels.shape, bool)
                notes, n_marked = [], 0
                for mp in mask_paths:
                    m, note = fit_mask(imaging.read_mask(mp, "binary"), img.pixels.shape, tolerance, mp.name)
                    merged |= m
                    n_marked += int(m.any())
                    notes += [note] if note else []
                return Built(image=img.pixels, label=merged if merged.any() else None, notes=notes,
                             n_masks=n_marked)

            samples.append(Sample("lesion", source, _safe_name(stem), item, row,
                                  [image_path, *mask_paths], build, params=f"tol={tolerance}"))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# CBIS-DDSM
# ----------------------------------------------------------------------------------------------------------------
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
        exact = self.root / rel
        if exact.is_file():
            return [exact]
        folder = self._index().get(rel.split("/")[0])
        if folder is None:
            return []
        return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".dcm", ".dicom"))


def _read_cbis_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [_norm_column(c) for c in df.columns]
    missing = [c for c in _CBIS_REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"{path} is not a CBIS-DDSM description CSV: columns {missing} missing "
                         f"(found {list(df.columns)}). Pass the mass/calc *_case_description_*.csv files.")
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
        if "image_file_path" in {_norm_column(c.strip('"')) for c in header.split(",")}:
            found.append(p)
    return found


def cbis_samples(cbis_dir: Path, csv_paths: list[Path], abnormality: str, tolerance: float,
                 report: Report) -> list[Sample]:
    """One lesion sample per CBIS-DDSM mammogram, its abnormalities' masks merged (see the module docstring)."""
    source = "cbis-ddsm"
    resolver = _CbisResolver(cbis_dir)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for csv_path in csv_paths:
        try:
            df = _read_cbis_csv(csv_path)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            report.error(str(exc))
            continue
        for idx, r in df.iterrows():
            item = f"{csv_path.name} row {idx + 1}"  # 1-based data row (a row may span lines: quoted newlines)
            abn = str(r["abnormality_type"]).strip().lower()
            if abnormality == "mass" and abn != "mass" or abnormality == "calc" and abn != "calcification":
                continue
            image_rel = clean_path_field(r["image_file_path"])
            if not image_rel:
                report.skip(source, item, "empty 'image file path'")
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
                "item": item, "image": image_rel, "roi": clean_path_field(r["roi_mask_file_path"]),
                "crop": clean_path_field(r["cropped_image_file_path"]), "abnormality": abn,
                "pathology": str(r["pathology"]).strip().upper(), "patient_id": str(r["patient_id"]).strip(),
                "side": str(r["left_or_right_breast"]).strip(), "view": str(r["image_view"]).strip().upper(),
                "abnormality_id": str(r.get("abnormality_id", "")).strip()})

    samples: list[Sample] = []
    for key in sorted(groups):
        rows = sorted(groups[key], key=lambda d: (d["image"], d["abnormality"], d["abnormality_id"], d["item"]))
        name = _safe_name("_".join(key[:4]))
        items = ", ".join(d["item"] for d in rows)
        image_files = []
        for d in rows:
            image_files = resolver.files(d["image"])
            if image_files:
                break
        if not image_files:
            report.skip(source, rows[0]["image"], f"image file not found below {cbis_dir} (CSV rows {items})")
            continue
        if len(image_files) > 1:
            report.skip(source, rows[0]["image"], f"ambiguous: {len(image_files)} DICOM files in the image's "
                                                  f"folder {image_files[0].parent} (CSV rows {items})")
            continue
        candidates = []
        missing = []
        for d in rows:
            # ROI-mask path first, then the cropped-image path (the two are sometimes swapped), then whatever
            # else the abnormality's folder holds.
            files: list[tuple[Path, str]] = []
            for field_name in ("roi", "crop"):
                for f in resolver.files(d[field_name]):
                    if f not in [x for x, _ in files]:
                        files.append((f, field_name))
            if not files:
                missing.append(f"{d['item']}: neither the ROI mask {d['roi']!r} nor the cropped image "
                               f"{d['crop']!r} exists")
            candidates.append((d, files))
        if missing:
            report.skip(source, rows[0]["image"], "; ".join(missing))
            continue
        split = "test" if key[0] == "Test" else ""
        row = {"patient_id": key[1] if len(key) == 4 else rows[0]["patient_id"],
               "laterality": normalise_laterality(key[2]), "view": key[3],
               "pathology": _pick_pathology(d["pathology"] for d in rows),
               "abnormality": ";".join(sorted({d["abnormality"] for d in rows})), "acquisition": "",
               "augmentation": "", "split": split, "original_name": rows[0]["image"]}
        inputs = [image_files[0]] + [f for _, files in candidates for f, _ in files]

        def build(image_file=image_files[0], candidates=candidates) -> Built:
            img = imaging.read_image(image_file)
            shape = img.pixels.shape
            merged = np.zeros(shape, bool)
            notes: list[str] = []
            for d, files in candidates:
                chosen, rejected = None, []
                for f, field_name in files:
                    px = imaging.read_image(f).pixels
                    if not _is_binary(px):
                        rejected.append(f"{f.name} ({field_name} path) is a grey-level image (the cropped patch)")
                        continue
                    try:
                        mask, note = fit_mask(px, shape, tolerance, f"{d['item']} {f.name}")
                    except SkipSample as exc:
                        rejected.append(str(exc))
                        continue
                    chosen = (mask, field_name, note)
                    break
                if chosen is None:
                    raise SkipSample(f"abnormality {d['item']}: no usable ROI mask: " + "; ".join(rejected))
                mask, field_name, note = chosen
                if field_name == "crop":
                    notes.append(f"{d['item']}: ROI mask and cropped-image paths swapped in the CSV; the binary "
                                 "file was used as the mask")
                if note:
                    notes.append(note)
                if not mask.any():
                    raise SkipSample(f"abnormality {d['item']}: the ROI mask is empty (all zero)")
                merged |= mask
            return Built(image=img.pixels, label=merged, notes=notes, n_masks=len(candidates))

        samples.append(Sample("lesion", source, name, rows[0]["image"], row, inputs, build,
                              params=f"tol={tolerance}"))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Mini-DDSM
# ----------------------------------------------------------------------------------------------------------------
def find_mini_tables(root: Path) -> list[Path]:
    """Every ``*.xlsx`` below ``root`` (Office lock files ``~$...`` excluded), sorted."""
    return sorted(p for p in root.rglob("*.xlsx") if not p.name.startswith(("~$", ".")))


class _FileIndex:
    """Lazy index of the files below a folder by lower-case name (for paths that do not resolve as written)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def find(self, rel: str) -> Path | None:
        if self._by_name is None:
            self._by_name = defaultdict(list)
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames.sort()
                for f in sorted(filenames):
                    self._by_name[f.lower()].append(Path(dirpath) / f)
        hits = self._by_name.get(rel.rsplit("/", 1)[-1].lower(), [])
        if len(hits) > 1:  # prefer the hit whose trailing components match the relative path best
            tail = [p.lower() for p in rel.split("/")]
            hits = sorted(hits, key=lambda h: -sum(1 for a, b in zip(reversed(h.parts), reversed(tail))
                                                  if a.lower() == b))
        return hits[0] if hits else None


def mini_records(root: Path, report: Report, more_than_two_masks: bool = False) -> list[dict]:
    """Rows of every Mini-DDSM spreadsheet below ``root`` as dicts with resolved paths (or ``None``).

    Tables whose path says "MoreThanTwoMasks" (or all of them when ``more_than_two_masks``) get the source
    "mini-ddsm-morethantwomasks", the others "mini-ddsm".
    """
    records = []
    index = _FileIndex(root)
    tables = find_mini_tables(root)
    if not tables:
        report.error(f"Mini-DDSM folder {root}: no .xlsx table (DataWMask.xlsx) found below it")
    for table in tables:
        try:
            df = pd.read_excel(table, sheet_name=0, dtype=str)
        except (OSError, ValueError, KeyError) as exc:
            report.error(f"cannot read Mini-DDSM table {table}: {exc}")
            continue
        df.columns = [str(c).strip() for c in df.columns]
        lower = {c.lower(): c for c in df.columns}
        if "fullpath" not in lower:
            report.error(f"{table} has no 'fullPath' column (found {list(df.columns)}); not a Mini-DDSM table")
            continue
        contour_cols = sorted((c for c in df.columns if re.fullmatch(r"tumou?r_?contour\d*", c.lower())),
                              key=lambda c: int(re.sub(r"\D", "", c) or 1))
        is_mttm = more_than_two_masks or "morethantwo" in re.sub(r"[\s_\-]+", "",
                                                                 str(table.relative_to(root.parent)).lower())
        source = "mini-ddsm-morethantwomasks" if is_mttm else "mini-ddsm"

        def resolve(rel: str) -> Path | None:
            if not rel:
                return None
            for base in (table.parent, root):
                if (base / rel).is_file():
                    return base / rel
            return index.find(rel)

        for idx, r in df.iterrows():
            item = f"{table.name} row {idx + 1}"
            full = clean_path_field(r[lower["fullpath"]])
            file_name = clean_path_field(r.get(lower.get("filename", ""), "")) or full.rsplit("/", 1)[-1]
            contours = [c for c in (clean_path_field(r[col]) for col in contour_cols) if c]
            records.append({
                "item": item, "source": source, "full": full, "file_name": file_name,
                "image": resolve(full), "contours": [(c, resolve(c)) for c in contours],
                "status": str(r.get(lower.get("status", ""), "") or "").strip(),
                "side": str(r.get(lower.get("side", ""), "") or "").strip(),
                "view": str(r.get(lower.get("view", ""), "") or "").strip().upper()})
    return records


def mini_samples(records: list[dict], include_normals: bool, tolerance: float, report: Report) -> list[Sample]:
    """Lesion samples from Mini-DDSM records; an image listed twice keeps the entry with more contours."""
    best: dict[str, dict] = {}
    for rec in records:
        key = rec["file_name"].lower()
        old = best.get(key)
        if old is None or len(rec["contours"]) > len(old["contours"]):
            if old is not None:
                report.skip(old["source"], old["item"], f"duplicate of {rec['item']} ({rec['source']}), which "
                                                        f"lists more tumour contours ({len(rec['contours'])})")
            best[key] = rec
        else:
            report.skip(rec["source"], rec["item"], f"duplicate of {old['item']} ({old['source']}) with no more "
                                                    "tumour contours")
    status_map = {"cancer": "MALIGNANT", "malignant": "MALIGNANT", "benign": "BENIGN", "normal": "NORMAL"}
    samples: list[Sample] = []
    for key in sorted(best):
        rec = best[key]
        item = rec["item"] + (f" ({rec['full']})" if rec["full"] else "")
        if rec["image"] is None:
            report.skip(rec["source"], item, f"image file {rec['full']!r} not found")
            continue
        missing = [c for c, p in rec["contours"] if p is None]
        if missing:
            report.skip(rec["source"], item, f"tumour contour file(s) not found: {missing}")
            continue
        if not rec["contours"] and not include_normals:
            report.skip(rec["source"], item, f"no tumour contour (Status {rec['status'] or '?'}); use "
                                             "--include-normals to keep it as a lesion-free sample")
            continue
        stem = Path(rec["file_name"]).stem
        meta = parse_image_name(stem)
        pathology = status_map.get(rec["status"].lower(), rec["status"].upper()) if rec["contours"] else "NORMAL"
        row = {"patient_id": meta["patient_id"],
               "laterality": normalise_laterality(rec["side"]) or meta["laterality"],
               "view": rec["view"] or meta["view"], "pathology": pathology, "abnormality": "", "acquisition": "",
               "augmentation": "", "split": "", "original_name": rec["full"]}
        contour_paths = [p for _, p in rec["contours"]]

        def build(image_path=rec["image"], contour_paths=contour_paths) -> Built:
            img = imaging.read_image(image_path)
            if not contour_paths:
                return Built(image=img.pixels, label=None)
            merged = np.zeros(img.pixels.shape, bool)
            notes = []
            for cp in contour_paths:
                mask, note = fit_mask(imaging.read_mask(cp, "binary"), img.pixels.shape, tolerance, cp.name)
                if not mask.any():
                    raise SkipSample(f"tumour contour {cp.name} is empty (all zero)")
                merged |= mask
                notes += [note] if note else []
            return Built(image=img.pixels, label=merged, notes=notes, n_masks=len(contour_paths))

        samples.append(Sample("lesion", rec["source"], _safe_name(stem), item, row,
                              [rec["image"], *contour_paths], build, params=f"tol={tolerance}"))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Synthetic set
# ----------------------------------------------------------------------------------------------------------------
def synthetic_samples(n: int, seed: int) -> list[Sample]:
    """``n`` tissue samples and ``n`` lesion samples drawn by :mod:`synthetic` (source "synthetic").

    The tissue and lesion samples of case ``i`` share the picture; a lesion-free case gets no mask file.
    """
    samples: list[Sample] = []
    for i in range(n):
        case = synthetic.make_case(i, seed)  # a few milliseconds; keeps names and metadata in one place
        params = f"synthetic v{synthetic.GENERATOR_VERSION} seed={seed} index={i} size={case.image.shape}"
        meta = {"patient_id": case.patient_id, "laterality": case.laterality, "view": case.view, "split": "",
                "original_name": f"synthetic:seed={seed}:index={i}"}
        samples.append(Sample("tissue", "synthetic", case.name, case.name, dict(meta), [],
                              lambda c=case: Built(image=c.image, label=c.tissue_label), params=params))
        lesion_meta = dict(meta, pathology="SYNTHETIC" if case.n_lesions else "NORMAL",
                           abnormality="synthetic blob" if case.n_lesions else "", acquisition="", augmentation="")
        samples.append(Sample("lesion", "synthetic", case.name, case.name, lesion_meta, [],
                              lambda c=case: Built(image=c.image, label=c.lesion_mask if c.n_lesions else None,
                                                   n_masks=c.n_lesions),
                              params=params))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# Tables, splits, report, archive
# ----------------------------------------------------------------------------------------------------------------
def assign_splits(df: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Fill the empty ``split`` cells with "train"/"val" by patient (``datasets.split_by_patient``).

    Rows whose split is already set ("test") keep it. Returns a copy.
    """
    out = df.copy()
    todo = out["split"].astype(str) == ""
    if not todo.any():
        return out
    part = out[todo]
    if val_fraction <= 0 or part["patient_id"].nunique() < 2:
        out.loc[todo, "split"] = "train"
        return out
    train, val = datasets.split_by_patient(part.reset_index(drop=True), val_fraction, seed)
    val_patients = set(val["patient_id"].astype(str))
    out.loc[todo, "split"] = ["val" if str(p) in val_patients else "train" for p in part["patient_id"]]
    return out


def _table(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for c in columns:
        if c in ("height", "width", "bit_depth", "n_masks"):
            df[c] = df[c].fillna(0).astype(int)
        else:
            df[c] = df[c].fillna("").astype(str)
    return df.sort_values(["source", "image_file_path"], kind="mergesort").reset_index(drop=True)


def _csv_bytes(df: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    df.to_csv(buf, index=False, lineterminator="\n")
    return buf.getvalue().encode("utf-8")


def table_conflict(df: pd.DataFrame, path: Path, overwrite: bool) -> str | None:
    """Why writing ``df`` to ``path`` would replace different content without ``--overwrite`` (None: safe to write).

    A re-run with the same sources writes identical bytes and needs no flag; a run with other sources would silently
    drop the rows of the earlier run, so it is refused unless ``overwrite``.
    """
    if overwrite or not path.is_file():
        return None
    new = _csv_bytes(df)
    old = path.read_bytes()
    if old == new:
        return None
    try:
        previous = pd.read_csv(io.BytesIO(old), dtype=str, keep_default_na=False)
        before = f"{len(previous)} rows from {sorted(set(previous.get('source', [])))}"
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        before = "content that is not a readable CSV"
    return (f"{path} holds {before}; this run would write {len(df)} rows from {sorted(set(df['source']))}. "
            "Pass every source in one run, use another --workspace, or add --overwrite to replace it")


def _counts(df: pd.DataFrame, mask_column: str | None) -> dict:
    out = {}
    for source, part in df.groupby("source", sort=True):
        entry = {"samples": int(len(part)), "patients": int(part["patient_id"].nunique()),
                 "splits": {k: int(v) for k, v in sorted(Counter(part["split"]).items())}}
        if mask_column:
            entry["lesion_free"] = int((part[mask_column] == "").sum())
        out[source] = entry
    return out


def _test_overlap(df: pd.DataFrame) -> list[str]:
    """Patients with images in the "test" split and in "train"/"val" (CBIS-DDSM's official split allows it)."""
    test = set(df.loc[df["split"] == "test", "patient_id"])
    return sorted(test & set(df.loc[df["split"] != "test", "patient_id"]))


def archive_workspace(workspace: Path, target: Path) -> Path:
    """Zip the workspace's CSVs, report and PNGs (not the caches) to ``target``, atomically and reproducibly."""
    skip_top = {"_extracted", "_downloads", ".prepare_manifest.json"}
    files = []
    for dirpath, dirnames, filenames in os.walk(workspace):
        rel_dir = Path(dirpath).relative_to(workspace)
        dirnames[:] = sorted(d for d in dirnames if not (rel_dir == Path(".") and d in skip_top))
        for f in sorted(filenames):
            if f.startswith(".tmp") or (rel_dir == Path(".") and f in skip_top):
                continue
            p = Path(dirpath) / f
            if p.resolve() != target.resolve():
                files.append(p)
    with atomic_writer(target) as stream, zipfile.ZipFile(stream, "w") as zf:
        for p in tqdm(files, desc="archive", unit="file", disable=None):
            arc = f"{workspace.name}/{p.relative_to(workspace).as_posix()}"
            info = zipfile.ZipInfo(arc, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if p.suffix == ".png" else zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, p.read_bytes())
    return target


def _print_summary(report_data: dict) -> None:
    print("\nSummary")
    header = f"{'table':<7} {'source':<28} {'samples':>7} {'patients':>8} {'lesion-free':>11} {'train':>6} " \
             f"{'val':>5} {'test':>5} {'skipped':>7}"
    print(header)
    print("-" * len(header))
    skipped = Counter(s["source"] for s in report_data["skipped"])
    for table in ("tissue", "lesion"):
        for source, c in report_data[table].items():
            sp = c["splits"]
            lf = c.get("lesion_free", "")
            print(f"{table:<7} {source:<28} {c['samples']:>7} {c['patients']:>8} {lf!s:>11} {sp.get('train', 0):>6} "
                  f"{sp.get('val', 0):>5} {sp.get('test', 0):>5} {skipped.get(source, 0):>7}")
    print(f"skipped items: {len(report_data['skipped'])} (reasons in prepare_report.json); "
          f"written {report_data['written']}, reused {report_data['reused']}; "
          f"{report_data['elapsed_s']:.1f} s")


def remove_stale_temporaries(workspace: Path) -> int:
    """Delete the ``.tmp*`` files / folders an interrupted run may have left in the workspace's own folders.

    Only the preparer's places are searched (the workspace's top level, ``tissue/``, ``lesion/``, and the top
    level of ``_extracted/`` and ``_downloads/``). Returns how many entries were removed.
    """
    found = [p for p in workspace.glob(".tmp*")]
    for sub in ("tissue", "lesion"):
        if (workspace / sub).is_dir():
            found += [p for p in (workspace / sub).rglob(".tmp*")]
    for sub in ("_extracted", "_downloads"):
        if (workspace / sub).is_dir():
            found += [p for p in (workspace / sub).glob(".tmp*")]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    return len(found)


def _inside(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False


# ----------------------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------------------
def main(args: argparse.Namespace) -> int:
    """Build the workspace. Returns 0 on success, 1 when a source could not be used at all, 2 on bad usage."""
    start = time.perf_counter()
    workspace: Path = args.workspace
    tissue_dirs = list(args.tissue_dir or [])
    lesion_dirs = list(args.lesion_dir or [])
    mini_dirs: list[tuple[Path, bool]] = [(d, False) for d in args.mini_ddsm_dir or []]
    cbis_dirs: list[tuple[Path, list[Path]]] = []
    if not any([args.zips_dir, args.cbis_zip, args.mini1_zip, args.mini2_zip, args.tissue_zip, args.tissue_url,
                args.cbis_dir, mini_dirs, tissue_dirs, lesion_dirs, args.synthetic]):
        print("error: no source given. Pass downloaded zips (--zips-dir), extracted folders (--cbis-dir, "
              "--mini-ddsm-dir, --tissue-dir, --lesion-dir) or --synthetic N for a smoke-test set.", file=sys.stderr)
        return 2
    if not 0 <= args.val_fraction < 1:
        print(f"error: --val-fraction must be in [0, 1), got {args.val_fraction}", file=sys.stderr)
        return 2
    inputs = [p for p in [args.zips_dir, args.cbis_dir, *(d for d, _ in mini_dirs), *tissue_dirs, *lesion_dirs]
              if p is not None]
    for p in inputs:
        if not p.exists():
            print(f"error: input folder {p} does not exist", file=sys.stderr)
            return 2
        if _inside(workspace, p):
            print(f"error: the workspace {workspace} lies inside the input folder {p}; inputs are never written "
                  "to. Choose a workspace outside it.", file=sys.stderr)
            return 2
    workspace.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(workspace)
    if removed:
        print(f"removed {removed} temporary file(s) left by an interrupted run")
    report = Report()

    # 1. zips and downloads -> extracted folders (cached in the workspace)
    zips: dict[str, list[Path]] = defaultdict(list)
    explicit = {"cbis": args.cbis_zip, "mini1": args.mini1_zip, "mini2": args.mini2_zip, "tissue": args.tissue_zip}
    if args.zips_dir:
        for z in sorted(args.zips_dir.glob("*.zip")):
            kind = classify_zip(z.name)
            if kind is None:
                report.skip("zips", z.name, "zip name not recognised (expected 'cbis', 'ddsm', 'mini', "
                                            "'morethantwomasks', 'fgt' or 'tissue' in it); pass it with --cbis-zip, "
                                            "--mini1-zip, --mini2-zip or --tissue-zip")
            elif explicit.get(kind) is None:
                zips[kind].append(z)
    for kind, z in explicit.items():
        if z is not None:
            if not z.is_file():
                print(f"error: --{kind}-zip {z} is not a file", file=sys.stderr)
                return 2
            zips[kind].append(z)
    if args.tissue_url:
        try:
            zips["tissue"].append(download(args.tissue_url, workspace / "_downloads"))
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    for kind in ("cbis", "mini1", "mini2", "tissue"):
        for z in zips.get(kind, []):
            try:
                folder = extract_zip(z, workspace / "_extracted", kind, report)
            except (zipfile.BadZipFile, OSError) as exc:
                report.error(f"cannot extract {z}: {exc}")
                continue
            if kind == "cbis":
                cbis_dirs.append((folder, [c for c in args.cbis_csv or [] if c.is_file()]))
            elif kind == "tissue":
                tissue_dirs.append(folder)
            else:
                mini_dirs.append((folder, kind == "mini2"))
    if args.cbis_csv and not args.cbis_dir and not cbis_dirs:
        print("error: --cbis-csv needs --cbis-dir (the folder the CSV's image paths are relative to) or a "
              "CBIS-DDSM zip", file=sys.stderr)
        return 2
    if args.cbis_dir:
        csvs = []
        for c in args.cbis_csv or []:
            cand = c if c.is_file() else args.cbis_dir / c
            if not cand.is_file():
                print(f"error: CBIS-DDSM CSV {c} not found (also looked in {args.cbis_dir})", file=sys.stderr)
                return 2
            csvs.append(cand)
        cbis_dirs.append((args.cbis_dir, csvs))

    # 2. samples of every source
    tissue: list[Sample] = []
    lesion: list[Sample] = []
    tol = args.mask_aspect_tolerance
    for d in tissue_dirs:
        tissue += tissue_samples(d, "ddsm_tissue", report)
    for d in lesion_dirs:
        lesion += lesion_dir_samples(d, report, tol)
    for d, csvs in cbis_dirs:
        csvs = csvs or find_cbis_csvs(d)
        if not csvs:
            report.error(f"CBIS-DDSM folder {d}: no description CSV found (pass --cbis-csv)")
            continue
        lesion += cbis_samples(d, csvs, args.abnormality, tol, report)
    if mini_dirs:
        records = [r for d, mttm in mini_dirs for r in mini_records(d, report, mttm)]
        lesion += mini_samples(records, args.include_normals, tol, report)
    if args.synthetic:
        syn = synthetic_samples(args.synthetic, args.seed)
        tissue += [s for s in syn if s.kind == "tissue"]
        lesion += [s for s in syn if s.kind == "lesion"]
    for kind, group in (("tissue", tissue), ("lesion", lesion)):
        seen: dict[str, Sample] = {}
        for s in group:
            out = s.outputs()[0]
            if out in seen:
                report.skip(s.source, s.item, f"same output name as {seen[out].item}; kept the first")
            else:
                seen[out] = s
        group[:] = list(seen.values())

    # 3. write images, then the tables
    manifest = Manifest(workspace / ".prepare_manifest.json")
    tissue_rows = process_samples(tissue, workspace, manifest, report, "tissue")
    lesion_rows = process_samples(lesion, workspace, manifest, report, "lesion")
    tissue_df = assign_splits(_table(tissue_rows, TISSUE_COLUMNS), args.val_fraction, args.seed)
    lesion_df = assign_splits(_table(lesion_rows, LESION_COLUMNS), args.val_fraction, args.seed)
    tables = [(df, workspace / name) for df, name in ((tissue_df, "tissue_dataset.csv"),
                                                      (lesion_df, "unified_segmentation_dataset.csv")) if len(df)]
    conflicts = [text for text in (table_conflict(df, path, args.overwrite) for df, path in tables) if text]
    if conflicts:
        for text in conflicts:
            print(f"error: {text}", file=sys.stderr)
        print("nothing was replaced (images prepared so far stay cached in the workspace)", file=sys.stderr)
        return 2
    for df, path in tables:
        atomic_write_bytes(path, _csv_bytes(df))

    report_data = {
        "preparer_version": PREPARER_VERSION,
        "arguments": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                      for k, v in sorted(vars(args).items())},
        "tissue": _counts(tissue_df, None) if len(tissue_df) else {},
        "lesion": _counts(lesion_df, "roi_mask_file_path") if len(lesion_df) else {},
        "lesion_test_patients_also_in_train_or_val": _test_overlap(lesion_df) if len(lesion_df) else [],
        "skipped_per_source": dict(sorted(Counter(s["source"] for s in report.skipped).items())),
        "skipped": report.skipped,
        "notes": report.notes,
        "errors": report.errors,
        "written": report.written,
        "reused": report.reused,
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    atomic_write_bytes(workspace / "prepare_report.json",
                        json.dumps(report_data, indent=1, ensure_ascii=False).encode("utf-8"))
    _print_summary(report_data)
    if args.archive:
        target = workspace.parent / f"{workspace.resolve().name}.zip" if args.archive == "auto" else Path(args.archive)
        if target.exists():
            print(f"note: replacing the existing archive {target}")
        archive_workspace(workspace, target)
        print(f"archive: {target}")
    if not len(tissue_df) and not len(lesion_df):
        print("error: no sample could be prepared; see prepare_report.json for the reasons", file=sys.stderr)
        return 1
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
