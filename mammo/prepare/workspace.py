"""Writing the preparer's workspace: images and masks, the CSV tables and their splits, the report, the archive.

- :func:`process_samples` writes (or reuses) the PNGs of each :class:`mammo.prepare.sources.common.Sample` and
  keeps the :class:`Manifest` (``.prepare_manifest.json``) up to date; :func:`drop_duplicate_outputs` keeps one
  sample per output name.
- Tables: :func:`make_table` (columns :data:`TISSUE_COLUMNS` / :data:`LESION_COLUMNS`, sorted rows),
  :func:`assign_splits` (patient-level train/val), :func:`csv_bytes`, :func:`table_conflict` (no silent
  replacement of other rows without ``--overwrite``).
- :func:`report_record` (``prepare_report.json``), :func:`print_summary`, :func:`archive_workspace`
  (``--archive``), :func:`remove_stale_temporaries` and :func:`inside` (the workspace may not lie in an input).

Safety and resumability: inputs are only read (the workspace may not lie inside an input folder); every output
is written to a temporary file and moved into place (``os.replace``); the manifest records, for each output, the
size and mtime of the files it was made from, so a re-run skips finished work and an interrupted run leaves
nothing that a later run would trust. CSV rows are sorted and hold no timestamps: two runs give identical CSVs.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from mammo.data import splits
from mammo import imaging
from mammo.core.fileio import atomic_write_bytes, atomic_writer
from mammo.prepare.sources.common import PREPARER_VERSION, Report, Sample, SkipSample
from mammo.data.tables import TableError, read_table

#: Columns of ``tissue_dataset.csv`` (the first five are the suite's contract).
TISSUE_COLUMNS = ["image_file_path", "label_file_path", "patient_id", "source", "split",
                  "laterality", "view", "original_name"]

#: Columns of ``unified_segmentation_dataset.csv`` (the first eight are the suite's contract).
LESION_COLUMNS = ["image_file_path", "roi_mask_file_path", "patient_id", "source", "laterality", "view",
                  "pathology", "split", "abnormality", "acquisition", "augmentation", "n_masks",
                  "height", "width", "bit_depth", "original_name"]


# ----------------------------------------------------------------------------------------------------------------
# Images and masks, cached by the manifest
# ----------------------------------------------------------------------------------------------------------------
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


def drop_duplicate_outputs(samples: list[Sample], report: Report) -> list[Sample]:
    """Keep the first sample of each output image path; every later one is reported as skipped."""
    seen: dict[str, Sample] = {}
    for s in samples:
        out = s.outputs()[0]
        if out in seen:
            report.skip(s.source, s.item, f"same output name as {seen[out].item}; kept the first")
        else:
            seen[out] = s
    return list(seen.values())


# ----------------------------------------------------------------------------------------------------------------
# Tables, splits, report, archive
# ----------------------------------------------------------------------------------------------------------------
def assign_splits(df: pd.DataFrame, val_fraction: float, seed: int) -> pd.DataFrame:
    """Fill the empty ``split`` cells with "train"/"val" by patient (``splits.split_by_patient``).

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
    train, val = splits.split_by_patient(part.reset_index(drop=True), val_fraction, seed)
    val_patients = set(val["patient_id"].astype(str))
    out.loc[todo, "split"] = ["val" if str(p) in val_patients else "train" for p in part["patient_id"]]
    return out


def make_table(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    """The table of ``rows`` with ``columns``, as written: height, width, bit_depth and n_masks as integers (0 when
    missing), every other column as text ("" when missing), rows sorted by source, then image path (stable)."""
    df = pd.DataFrame(rows, columns=columns)
    for c in columns:
        if c in ("height", "width", "bit_depth", "n_masks"):
            df[c] = df[c].fillna(0).astype(int)
        else:
            df[c] = df[c].fillna("").astype(str)
    return df.sort_values(["source", "image_file_path"], kind="mergesort").reset_index(drop=True)


def csv_bytes(df: pd.DataFrame) -> bytes:
    """``df`` as the bytes of a workspace CSV: UTF-8, ``\\n`` line ends, no index column."""
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
    new = csv_bytes(df)
    old = path.read_bytes()
    if old == new:
        return None
    try:
        previous = read_table(path, kinds={"source": "label"}, allow_empty=True)
    except (TableError, OSError):
        previous = None
    sources = sorted(set(df["source"]))
    if previous is not None and sorted(set(previous.get("source", []))) == sources and len(previous) == len(df):
        return (f"{path} differs from what this run writes from the same sources: {_first_difference(old, new)} "
                "(edited by hand?); use another --workspace, or add --overwrite to replace it")
    before = ("content that is not a readable CSV" if previous is None
              else f"{len(previous)} rows from {sorted(set(previous.get('source', [])))}")
    return (f"{path} holds {before}; this run would write {len(df)} rows from {sources}. "
            "Pass every source in one run, use another --workspace, or add --overwrite to replace it")


def _first_difference(old: bytes, new: bytes) -> str:
    """Where two workspace CSVs first differ: ``row R (the header is row 1), column 'C': 'x' in the file, 'y' from
    this run``, or the first differing line when the columns differ."""
    old_rows = list(csv.reader(io.StringIO(old.decode("utf-8-sig", errors="replace"))))
    new_rows = list(csv.reader(io.StringIO(new.decode("utf-8"))))
    header = new_rows[0] if new_rows else []
    for number, (was, now) in enumerate(zip(old_rows, new_rows), start=1):
        if was == now:
            continue
        if number > 1 and len(was) == len(now) == len(header):
            column = next(i for i, (a, b) in enumerate(zip(was, now)) if a != b)
            return (f"row {number} (the header is row 1), column {header[column]!r}: {was[column]!r} in the file, "
                    f"{now[column]!r} from this run")
        return f"line {number} reads {','.join(was)[:80]!r} in the file, {','.join(now)[:80]!r} from this run"
    return f"the file has {len(old_rows)} lines, this run {len(new_rows)}"


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


def report_record(arguments: dict, tissue_df: pd.DataFrame, lesion_df: pd.DataFrame, report: Report,
                  elapsed_s: float) -> dict:
    """The content of ``prepare_report.json``: version, arguments, counts per source and split, skipped items,
    notes, errors, written / reused counts and the elapsed time (seconds, rounded to ms)."""
    return {
        "preparer_version": PREPARER_VERSION,
        "arguments": {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if isinstance(v, list) else v)
                      for k, v in sorted(arguments.items())},
        "tissue": _counts(tissue_df, None) if len(tissue_df) else {},
        "lesion": _counts(lesion_df, "roi_mask_file_path") if len(lesion_df) else {},
        "lesion_test_patients_also_in_train_or_val": _test_overlap(lesion_df) if len(lesion_df) else [],
        "skipped_per_source": dict(sorted(Counter(s["source"] for s in report.skipped).items())),
        "skipped": report.skipped,
        "notes": report.notes,
        "errors": report.errors,
        "written": report.written,
        "reused": report.reused,
        "elapsed_s": round(elapsed_s, 3),
    }


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


def print_summary(report_data: dict) -> None:
    """Print the per-source table of a :func:`report_record` and the totals line."""
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


def inside(child: Path, parent: Path) -> bool:
    """True when ``child`` is ``parent`` or lies below it (links resolved)."""
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False
