"""What every dataset source shares, and what the workspace writer (``mammo/prepare/workspace.py``) consumes.

- :class:`Sample` (one output image + label or mask: its CSV metadata, its input files, how to build it),
  :class:`Built` (what building returns), :class:`SkipSample` (why an input item cannot be used),
  :class:`Report` (a run's skipped items, notes and errors) and :data:`PREPARER_VERSION` (part of every cache key).
  They live here rather than in ``mammo/prepare/workspace.py`` so that imports run one way: each source and the
  workspace writer import this module, which imports neither.
- Constants shared by the sources: :data:`IMAGE_SUFFIXES`, :data:`TISSUE_LABEL_INTENSITIES`,
  :data:`DEFAULT_MASK_ASPECT_TOLERANCE`, the CDD-CESM name pattern :data:`CDD_NAME`.
- Table cells and file names: :func:`clean_path_field`, :func:`normalise_laterality` (both through
  ``mammo.data.tables.normalise_cell``, the suite's one cell normaliser), :func:`parse_image_name` (patient,
  laterality, view from a file stem), :func:`safe_name` (output file stems).
- Masks: :func:`is_binary`, :func:`fit_mask` (resize onto the image within an aspect-ratio tolerance),
  :func:`pick_pathology` (one pathology for several abnormalities).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import cv2
import numpy as np

from mammo.data import splits
from mammo.data.tables import normalise_cell

#: Bump when the outputs made from the same inputs change; part of every cache key in the manifest.
PREPARER_VERSION = 1

#: DDSM tissue-label intensities (dataset readme of tiryakiv/Mammogram-segmentation; ../shared/data/README.md).
TISSUE_LABEL_INTENSITIES = (64, 128, 192, 255)

#: Relative aspect-ratio difference under which a differently sized mask is resized (nearest) onto its image.
DEFAULT_MASK_ASPECT_TOLERANCE = 0.02

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".dcm", ".dicom")

#: Severity order used to give an image with several abnormalities one pathology (most severe wins).
_PATHOLOGY_ORDER = ("MALIGNANT", "BENIGN", "BENIGN_WITHOUT_CALLBACK", "NORMAL", "")

#: CDD-CESM file stems: ``[flipped_|mirrored_]P<patient>_<L|R>_<DM|CM>_<CC|MLO>``.
CDD_NAME = re.compile(r"^(?:(?P<aug>flipped|mirrored)_)?(?P<pid>P\d+)_(?P<lat>[LR])_(?P<acq>DM|CM)_"
                      r"(?P<view>CC|MLO)$", re.IGNORECASE)
_DDSM_NAME = re.compile(r"^(?P<pid>[A-Z]_\d{4})_\d+\.(?P<side>LEFT|RIGHT)_(?P<view>CC|MLO)$", re.IGNORECASE)
_LAT_TOKEN = re.compile(r"(?:^|[_\-. ])(?P<lat>L|R|LEFT|RIGHT)(?=$|[_\-. ])", re.IGNORECASE)
_VIEW_TOKEN = re.compile(r"(?:^|[_\-. ])(?P<view>CC|MLO|ML|LM|XCCL|XCCM)(?=$|[_\-. ])", re.IGNORECASE)


class SkipSample(Exception):
    """One input item cannot be used; the message is the reason written to the report."""


# ----------------------------------------------------------------------------------------------------------------
# Table cells, file names, masks
# ----------------------------------------------------------------------------------------------------------------
def clean_path_field(value: object) -> str:
    """A path cell of a dataset table, normalised by the suite's one cell normaliser (``tables.normalise_cell`` with
    kind ``path``): newlines/tabs removed, whitespace stripped, ``\\`` -> ``/``, leading ``./`` dropped; ``""`` for an
    empty cell, NaN, or the Mini-DDSM "no contour" marker ``-``."""
    return normalise_cell(value, "path")


def normalise_laterality(value: object) -> str:
    """``"LEFT"``/``"l"``/``"L"`` -> ``"L"``, right likewise (``tables.normalise_cell`` kind ``laterality``);
    anything else -> ``""``."""
    text = normalise_cell(value, "laterality")
    return text if text in ("L", "R") else ""


def parse_image_name(stem: str) -> dict:
    """Metadata from a file stem.

    Handles CDD-CESM names (``[flipped_|mirrored_]P<patient>_<L|R>_<DM|CM>_<CC|MLO>``), DDSM case names
    (``A_0002_1.RIGHT_MLO``: patient ``A_0002``) and, for other names, laterality / view tokens between
    ``_ - .`` separators with ``splits.patient_id_from_name`` for the patient.

    Returns:
        dict with ``patient_id``, ``laterality`` ("L"/"R"/""), ``view``, ``acquisition`` ("DM"/"CM"/""),
        ``augmentation`` ("flipped"/"mirrored"/"") and ``dataset`` ("cdd-cesm", "ddsm" or "").
    """
    m = CDD_NAME.match(stem)
    if m:
        return {"patient_id": m["pid"].upper(), "laterality": m["lat"].upper(), "view": m["view"].upper(),
                "acquisition": m["acq"].upper(), "augmentation": (m["aug"] or "").lower(), "dataset": "cdd-cesm"}
    m = _DDSM_NAME.match(stem)
    if m:
        return {"patient_id": m["pid"].upper(), "laterality": normalise_laterality(m["side"]),
                "view": m["view"].upper(), "acquisition": "", "augmentation": "", "dataset": "ddsm"}
    lat = _LAT_TOKEN.search(stem)
    view = _VIEW_TOKEN.search(stem)
    return {"patient_id": str(splits.patient_id_from_name(stem)),
            "laterality": normalise_laterality(lat["lat"]) if lat else "",
            "view": view["view"].upper() if view else "", "acquisition": "", "augmentation": "", "dataset": ""}


def safe_name(text: str) -> str:
    """A file-name-safe version of ``text`` (path separators and control characters replaced by ``_``)."""
    return re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", text).strip(" .") or "unnamed"


def is_binary(pixels: np.ndarray) -> bool:
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


def pick_pathology(values: Iterable[str]) -> str:
    """One pathology for an image with several abnormalities: the most severe by :data:`_PATHOLOGY_ORDER`.

    An unlisted value is returned only when no listed one is present (the first in sort order); none gives ``""``.
    """
    vals = {str(v).strip().upper() for v in values}
    for p in _PATHOLOGY_ORDER:
        if p in vals:
            return p
    return sorted(vals)[0] if vals else ""


# ----------------------------------------------------------------------------------------------------------------
# Samples and the report
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
        base = f"{self.kind}/{safe_name(self.source)}"
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
