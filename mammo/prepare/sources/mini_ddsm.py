"""Mini-DDSM: the Kaggle release's spreadsheets (``DataWMask.xlsx``, Data-MoreThanTwoMasks) -> lesion samples.

Columns ``fullPath``, ``fileName``, ``View``, ``Side``, ``Status`` (Normal/Benign/Cancer), ``Tumour_Contour``,
``Tumour_Contour2`` [, ``Tumour_Contour3`` ... in Data-MoreThanTwoMasks], ``Age``, ``Density``: paths use
backslashes (made ``/``) and are resolved relative to the spreadsheet's folder, then to the ``--mini-ddsm-dir``,
then by file name anywhere below it; ``-`` or an empty cell means "no contour"; every ``Tumour_Contour*`` column
is merged. The spreadsheets are read by ``mammo.data.tables.read_table`` (every header and cell normalised;
``A.PNG`` in a cell finds ``A.png``). Assumed (not verifiable offline): the first sheet holds the table,
``fileName`` looks like ``A_0002_1.LEFT_CC.png`` (patient = ``A_0002``), and an image listed in both tables keeps
the entry with more contours. Images without a contour (Normal cases and the unmarked side of a Benign/Cancer
case: DDSM outlines every abnormality it records) are kept as lesion-free samples (pathology ``NORMAL``) only with
``--include-normals``.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

from mammo import imaging
from mammo.prepare.sources.common import (Built, Report, Sample, SkipSample, fit_mask, normalise_laterality,
                                          parse_image_name, safe_name)
from mammo.data.tables import existing_path, normalise_cell, read_table

#: Cell kinds of the Mini-DDSM spreadsheets' fixed columns (``tables.normalise_cell``; the ``Tumour_Contour*``
#: columns are paths too); column names as ``tables.normalise_header`` gives them.
_MINI_KINDS = {"fullpath": "path", "filename": "path", "view": "view"}


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
    spreadsheets = find_mini_tables(root)
    if not spreadsheets:
        report.error(f"Mini-DDSM folder {root}: no .xlsx table (DataWMask.xlsx) found below it")
    for table in spreadsheets:
        try:
            df = read_table(table, kinds=_MINI_KINDS, what="Mini-DDSM table", allow_empty=True)
        except (OSError, ValueError) as exc:
            report.error(f"cannot read Mini-DDSM table {table}: {exc}")
            continue
        lower = {c.lower(): c for c in df.columns}
        if "fullpath" not in lower:
            report.error(f"{table} has no 'fullPath' column (found {list(df.columns)}); not a Mini-DDSM table")
            continue
        contour_cols = sorted((c for c in df.columns if re.fullmatch(r"tumou?r_?contour\d*", c.lower())),
                              key=lambda c: int(re.sub(r"\D", "", c) or 1))
        is_mttm = more_than_two_masks or "morethantwo" in re.sub(r"[\s_\-]+", "",
                                                                 str(table.relative_to(root.parent)).lower())
        source = "mini-ddsm-morethantwomasks" if is_mttm else "mini-ddsm"

        def resolve(rel: str, folder: Path = table.parent) -> Path | None:
            if not rel:
                return None
            for base in (folder, root):
                if existing_path(base / rel).is_file():
                    return existing_path(base / rel)
            return index.find(rel)

        for idx, r in df.iterrows():
            item = f"{table.name} row {idx + 1}"
            full = r[lower["fullpath"]]
            file_name = r.get(lower.get("filename", ""), "") or full.rsplit("/", 1)[-1]
            contours = [c for c in (normalise_cell(r[col], "path") for col in contour_cols) if c]
            records.append({
                "item": item, "source": source, "full": full, "file_name": file_name,
                "image": resolve(full), "contours": [(c, resolve(c)) for c in contours],
                "status": r.get(lower.get("status", ""), ""), "side": r.get(lower.get("side", ""), ""),
                "view": r.get(lower.get("view", ""), "")})
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

        samples.append(Sample("lesion", rec["source"], safe_name(stem), item, row,
                              [rec["image"], *contour_paths], build, params=f"tol={tolerance}"))
    return samples
