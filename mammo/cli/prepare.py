"""Turn public mammography dataset downloads into one training workspace, and say what could not be used.

This module owns the command line (``prepare_to_train.py`` is its face) and wires the library modules together;
the work lives in :mod:`mammo.prepare`:

- ``mammo/prepare/sources/``: one module per kind of input, each turning its files into samples: ``cbis_ddsm.py``,
  ``mini_ddsm.py``, ``csaw_s.py``, ``folders.py`` (tissue-label folders; ``images/`` + ``masks/`` folders),
  ``archives.py`` (zips and the download), ``synthetic_source.py``, and ``common.py`` (the sample contract, the
  report, file-name parsing, mask fitting). Each source module's docstring lists its dataset's quirks and the
  assumptions made.
- ``mammo/prepare/workspace.py``: writing images and masks (cached by a manifest), the tables and their
  patient-level splits, the report and the archive; its docstring explains how runs stay safe and resumable.

Sources (any combination):

- CBIS-DDSM (``--cbis-dir`` + its description CSVs ``--cbis-csv``, or a zip): DICOM full mammograms, the
  cropped patches and the ROI masks named in the CSVs.
- Mini-DDSM (``--mini-ddsm-dir`` with ``DataWMask.xlsx``, and the "Data-MoreThanTwoMasks" part, or zips).
- The DDSM tissue-label set of Tiryaki & Kaplanoglu (``--tissue-dir`` with the ``fgt_seg`` / ``fgt_seg_labels``
  layout, a zip, or ``--tissue-url``).
- Any ``images/`` + ``masks/`` pair folder (``--lesion-dir``), e.g. the CDD-CESM files in ``../shared/data``.
- CSAW-S (``--csaw-dir``: ``images/`` + ``masks/``): partial tissue labels for stage 1; the ``--csaw-holdout``
  patients get split ``test``.
- ``--synthetic N``: a small procedural set (``mammo/data/synthetic.py``) for smoke tests; never a stand-in for
  real data.

Workspace written (``--workspace``; every path in the CSVs is relative to the workspace, so it can be moved):

- ``tissue/<source>/images/<name>.png`` + ``tissue/<source>/labels/<name>_LI.png`` (DDSM encoding kept:
  64 background, 128 adipose, 192 FGT, 255 pectoral) and ``tissue_dataset.csv`` (columns
  :data:`mammo.prepare.workspace.TISSUE_COLUMNS`).
- ``lesion/<source>/images/<name>.png`` + ``lesion/<source>/masks/<name>_mask.png`` (one 0/255 mask per image,
  all its lesions merged; no mask file and an empty ``roi_mask_file_path`` for a lesion-free image) and
  ``unified_segmentation_dataset.csv`` (columns :data:`mammo.prepare.workspace.LESION_COLUMNS`). Laterality is
  ``L``/``R``, view ``CC``/``MLO``; ``acquisition`` is ``DM``/``CM`` for CDD-CESM (low-energy vs
  contrast-enhanced: report them apart), ``augmentation`` is ``flipped``/``mirrored`` for CDD-CESM's augmented
  copies.
- ``prepare_report.json``: counts per source and split, every skipped row with its reason, notes (swapped
  crop/mask paths, resized masks), elapsed time. ``--archive`` zips the finished workspace.
- The CSVs list the samples of the latest run: pass every source in one run (finished images are reused).
- Caches that training never reads: ``_extracted/`` (zips extracted once, checked against the zip's size and
  mtime), ``_downloads/`` and ``.prepare_manifest.json`` (what each output was made from).

Images are converted to PNG with the suite's one reader (``mammo.imaging.read_image``: 16-bit stays 16-bit, DICOM
decoded with its LUTs). Splits are patient-level (``mammo.data.splits.split_by_patient``, ``--val-fraction``,
``--seed``); CBIS-DDSM "Test" rows and tissue images under a ``test`` folder get split ``test``.

Inputs are only read (the workspace may not lie inside an input folder), every output is written atomically,
and a re-run reuses finished work and gives identical CSVs (see ``mammo/prepare/workspace.py``).

Example::

    python prepare_to_train.py --tissue-dir ../shared/data/tissue/train_valid \\
        --lesion-dir ../shared/data/lesion_cdd_cesm --workspace workspace
    python prepare_to_train.py --synthetic 16 --workspace workspace_synthetic
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mammo.cli import common
from mammo.cascade import checks
from mammo.core.fileio import atomic_write_bytes
from mammo.prepare.sources.archives import DEFAULT_TISSUE_URL, classify_zip, download, extract_zip
from mammo.prepare.sources.cbis_ddsm import cbis_samples, find_cbis_csvs, read_cbis_csv
from mammo.prepare.sources.common import DEFAULT_MASK_ASPECT_TOLERANCE, Report, Sample
from mammo.prepare.sources.csaw_s import csaw_patients, csaw_samples
from mammo.prepare.sources.folders import lesion_dir_samples, pair_folders, tissue_folders, tissue_samples
from mammo.prepare.sources.mini_ddsm import find_mini_tables, mini_records, mini_samples
from mammo.prepare.sources.synthetic_source import synthetic_samples
from mammo.prepare.workspace import (LESION_COLUMNS, TISSUE_COLUMNS, Manifest, archive_workspace, assign_splits,
                                     csv_bytes, drop_duplicate_outputs, inside, make_table, print_summary,
                                     process_samples, remove_stale_temporaries, report_record, table_conflict)


#: ``--csaw-holdout``'s default: the patient of ``../shared/data/csaw_s_dev`` kept out of training.
DEFAULT_CSAW_HOLDOUT = "002"


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------
def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the preparer (see the module docstring for what each source expects)."""
    parser = common.ArgumentParser(description="Prepare a training workspace from mammography datasets.",
                                add_help=add_help, parents=[common.runtime_parser("seed")])
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
    parser.add_argument("--csaw-dir", type=Path, action="append", default=None,
                        help="CSAW-S folder (images/ + masks/ <stem>_pectoral_muscle.png, ...): digital mammograms "
                             "with partial tissue labels for stage 1 (sources/csaw_s.py); repeatable")
    parser.add_argument("--csaw-holdout", default=DEFAULT_CSAW_HOLDOUT, metavar="IDS",
                        help="comma-separated CSAW-S patient ids kept out of training (split 'test'), spelled as the "
                             "image names spell them (002 for 002_0.png), or 'none'; each must be a patient of "
                             "--csaw-dir (default: %(default)s)")
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
    parser.add_argument("--archive", nargs="?", const="auto", default=None, metavar="ZIP",
                        help="zip the finished workspace (without caches) to ZIP (default when given without a "
                             "value: <workspace>.zip beside the workspace)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace workspace tables that hold other rows (a re-run with the same sources needs "
                             "no flag: it writes identical tables)")
    return parser


# ----------------------------------------------------------------------------------------------------------------
# Checks before any work
# ----------------------------------------------------------------------------------------------------------------
#: What each input-folder flag expects, ending its messages.
_FOLDER_FIXES = {
    "--zips-dir": "pass the folder holding the downloaded zips, or one zip with --cbis-zip / --mini1-zip / "
                  "--mini2-zip / --tissue-zip",
    "--cbis-dir": "pass the CBIS-DDSM image folder (the CSVs' paths are relative to it), or its zip with --cbis-zip",
    "--mini-ddsm-dir": "pass the Mini-DDSM folder holding DataWMask.xlsx, or its zip with --mini1-zip",
    "--tissue-dir": "pass the tissue-label folder holding fgt_seg/ and fgt_seg_labels/, or its zip with --tissue-zip",
    "--lesion-dir": "pass a folder holding images/ and masks/ with the same file stems",
    "--csaw-dir": "pass the CSAW-S folder holding images/ and masks/ (<stem>_pectoral_muscle.png, ...)",
}


def _cbis_csv_path(csv: Path, cbis_dir: Path | None) -> Path:
    """A ``--cbis-csv`` as given, else looked up in ``--cbis-dir``; FileNotFoundError naming both places."""
    if csv.is_file() or cbis_dir is None:
        return csv
    if (cbis_dir / csv).is_file():
        return cbis_dir / csv
    raise FileNotFoundError(f"--cbis-csv {csv} not found (also looked in {cbis_dir}); pass a CBIS-DDSM description "
                            "CSV (mass/calc *_case_description_*.csv)")


def _cbis_zips(args: argparse.Namespace) -> list[Path]:
    """The CBIS-DDSM zips of the run: ``--cbis-zip``, else the zips of ``--zips-dir`` named so (``classify_zip``),
    as :func:`_zips_by_kind` picks them."""
    if args.cbis_zip is not None:
        return [args.cbis_zip]
    if args.zips_dir is None or not args.zips_dir.is_dir():
        return []
    return [z for z in sorted(args.zips_dir.glob("*.zip")) if classify_zip(z.name) == "cbis"]


def _zip_holds(archive: Path, name: str) -> bool:
    """Whether the zip ``archive`` holds a member whose file name is ``name`` (in any folder)."""
    try:
        with zipfile.ZipFile(archive) as opened:
            return any(member.replace("\\", "/").rsplit("/", 1)[-1] == name for member in opened.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _check_cbis_csvs(args: argparse.Namespace) -> None:
    """Each ``--cbis-csv`` is a CBIS-DDSM description CSV here (as given, or in ``--cbis-dir``), or, with a zip and no
    ``--cbis-dir``, the name of a file inside a CBIS-DDSM zip (used from the extracted folder).

    Raises:
        FileNotFoundError, ValueError: one line naming the CSV, where it was looked for and the fix.
    """
    if not args.cbis_csv:
        return
    zips = _cbis_zips(args) if args.cbis_dir is None else []
    if args.cbis_dir is None and not zips:
        raise checks.UserInputError(f"--cbis-csv {args.cbis_csv[0]} needs --cbis-dir (the folder the CSV's image "
                                    f"paths are relative to) or a CBIS-DDSM zip (--cbis-zip, or a zip named "
                                    f"'cbis'/'ddsm' in --zips-dir {args.zips_dir})")
    for csv in args.cbis_csv:
        if args.cbis_dir is not None or csv.exists():
            read_cbis_csv(_cbis_csv_path(csv, args.cbis_dir))
        elif not any(_zip_holds(z, csv.name) for z in zips):
            raise checks.UserInputError(f"--cbis-csv {csv} is not a file here, nor a file inside the CBIS-DDSM zip "
                                        f"{', '.join(z.name for z in zips)}; pass a description CSV (mass/calc "
                                        "*_case_description_*.csv), or the name of one inside the zip")


def _cbis_csvs_for(folder: Path, csvs: list[Path]) -> list[Path]:
    """The ``--cbis-csv`` files for a folder extracted from a CBIS-DDSM zip: those that are files here, and the files
    of that name inside ``folder`` for the others."""
    found = [c for c in csvs if c.is_file()]
    for csv in csvs:
        if not csv.is_file():
            found += sorted(folder.rglob(csv.name))
    return found


def _archive_path(args: argparse.Namespace) -> Path:
    """The zip ``--archive`` writes: the path given, or ``<workspace>.zip`` beside the workspace."""
    workspace = Path(args.workspace)
    return workspace.parent / f"{workspace.resolve().name}.zip" if args.archive == "auto" else Path(args.archive)


def _csaw_holdout(text: str) -> set[str]:
    """``--csaw-holdout``'s patient ids: comma-separated, blanks dropped; "none" (any case) for no id."""
    if text.strip().lower() == "none":
        return set()
    return {p.strip() for p in text.split(",") if p.strip()}


def _patient_key(patient: str) -> str:
    """A patient id without a ``CSAW_`` prefix and leading zeros, to suggest the id a user meant (``2`` -> ``002``)."""
    bare = patient[5:] if patient.lower().startswith("csaw_") else patient
    return bare.lstrip("0") or "0"


def _check_csaw_holdout(text: str, folders: list[Path]) -> None:
    """Every ``--csaw-holdout`` patient is a patient of the ``--csaw-dir`` folders, spelled as their file names spell
    it: a patient not found would be trained on instead of held out.

    Raises:
        checks.UserInputError: one line naming the value, the patients found (the first 12) and the fix.
    """
    found = sorted({p for folder in folders for p in csaw_patients(folder)})
    unknown = sorted(_csaw_holdout(text) - set(found))
    if not unknown:
        return
    default = " (the default)" if text == DEFAULT_CSAW_HOLDOUT else ""
    where = ", ".join(str(folder / "images") for folder in folders)
    listed = ", ".join(found[:12]) + (f", ... ({len(found)} in all)" if len(found) > 12 else "") if found else "none"
    by_key = {_patient_key(p): p for p in found}
    meant = sorted({by_key[_patient_key(u)] for u in unknown if _patient_key(u) in by_key})
    fix = ("pass patient ids as the image names spell them (<patient>_<view>.png), comma-separated, or 'none' to "
           "hold out no patient")
    if meant:
        fix = f"did you mean {', '.join(meant)}? P{fix[1:]}"
    raise checks.UserInputError(f"--csaw-holdout {text}{default}: no CSAW-S patient {', '.join(map(repr, unknown))} "
                                f"in {where} (patients found: {listed}); {fix}")


def _check_inputs(args: argparse.Namespace) -> None:
    """Every path flag and number checked before any work: a folder that is a file or missing, a folder without its
    dataset's layout, a zip that is not one, a CBIS-DDSM CSV that is not one (nor in the CBIS-DDSM zip), a
    ``--csaw-holdout`` patient not in ``--csaw-dir``, a workspace or archive path that cannot be written, a negative
    tolerance or count.

    Raises:
        FileNotFoundError, ValueError (``checks.UserInputError``, ``mammo.data.tables.TableError``): one line naming the
            file or flag, what is wrong and the fix.
    """
    checks.number(args.mask_aspect_tolerance, "--mask-aspect-tolerance", 0)
    checks.number(args.synthetic, "--synthetic", 0)
    checks.writable_folder(args.workspace, "--workspace")
    if args.archive is not None:
        checks.output_file(_archive_path(args), "--archive", "workspace.zip")
    folders = [("--zips-dir", args.zips_dir), ("--cbis-dir", args.cbis_dir)]
    repeatable = (("--mini-ddsm-dir", args.mini_ddsm_dir), ("--tissue-dir", args.tissue_dir),
                  ("--lesion-dir", args.lesion_dir), ("--csaw-dir", args.csaw_dir))
    folders += [(flag, d) for flag, values in repeatable for d in values or []]
    for flag, folder in folders:
        if folder is not None:
            checks.input_folder(folder, flag, _FOLDER_FIXES[flag])
    layouts = (("--tissue-dir", args.tissue_dir, tissue_folders, "no fgt_seg/ folder with a sibling fgt_seg_labels/"),
               ("--lesion-dir", args.lesion_dir, pair_folders, "no folder holding both images/ and masks/"),
               ("--mini-ddsm-dir", args.mini_ddsm_dir, find_mini_tables, "no .xlsx table (DataWMask.xlsx)"),
               ("--csaw-dir", args.csaw_dir, lambda d: (d / "images").is_dir() and (d / "masks").is_dir(),
                "no images/ + masks/ sub-folders"))
    for flag, values, find, lacking in layouts:
        for folder in values or []:
            if not find(folder):
                raise checks.UserInputError(f"{flag} {folder} holds {lacking} at any depth; {_FOLDER_FIXES[flag]}")
    if args.csaw_dir:
        _check_csaw_holdout(args.csaw_holdout, args.csaw_dir)
    if args.cbis_dir is not None and not args.cbis_csv and not find_cbis_csvs(args.cbis_dir):
        raise checks.UserInputError(f"--cbis-dir {args.cbis_dir} holds no CBIS-DDSM description CSV (a CSV with "
                                         "an 'image file path' column); pass them with --cbis-csv")
    for flag, z in (("--cbis-zip", args.cbis_zip), ("--mini1-zip", args.mini1_zip), ("--mini2-zip", args.mini2_zip),
                    ("--tissue-zip", args.tissue_zip)):
        if z is not None:
            checks.input_file(z, flag, "pass the downloaded zip, or the extracted folder with its -dir flag")
            if not zipfile.is_zipfile(z):
                raise checks.UserInputError(f"{flag} {z} is {checks.describe(z)}, not a zip archive; pass "
                                                 "the downloaded zip, or the extracted folder with its -dir flag")
    _check_cbis_csvs(args)


# ----------------------------------------------------------------------------------------------------------------
# main and its steps
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class _Folders:
    """The input folders of each source: those given, then the zips extracted into the workspace."""

    tissue: list[Path] = field(default_factory=list)
    lesion: list[Path] = field(default_factory=list)
    #: (folder, whether it is the Data-MoreThanTwoMasks part)
    mini: list[tuple[Path, bool]] = field(default_factory=list)
    #: (image root, its description CSVs; none: the CSVs found in the folder)
    cbis: list[tuple[Path, list[Path]]] = field(default_factory=list)


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The first bad-usage message, before any work (no source, ``--cbis-csv`` without its images, a bad
    ``--val-fraction``, a flag or path refused by :func:`_check_inputs`, a workspace inside an input), else None."""
    if args.cbis_csv and not (args.cbis_dir or args.cbis_zip or args.zips_dir):
        return (f"--cbis-csv {args.cbis_csv[0]} needs --cbis-dir (the folder the CSV's image paths are relative to) "
                "or a CBIS-DDSM zip (--cbis-zip or --zips-dir)")
    if not any([args.zips_dir, args.cbis_zip, args.mini1_zip, args.mini2_zip, args.tissue_zip, args.tissue_url,
                args.cbis_dir, args.mini_ddsm_dir, args.tissue_dir, args.lesion_dir, args.csaw_dir, args.synthetic]):
        return ("no source given. Pass downloaded zips (--zips-dir), extracted folders (--cbis-dir, "
                "--mini-ddsm-dir, --tissue-dir, --lesion-dir) or --synthetic N for a smoke-test set.")
    if not 0 <= args.val_fraction < 1:
        return f"--val-fraction must be in [0, 1), got {args.val_fraction}"
    try:
        _check_inputs(args)
    except (FileNotFoundError, ValueError) as error:
        return checks.one_line(error)
    inputs = [p for p in [args.zips_dir, args.cbis_dir, *(args.mini_ddsm_dir or []), *(args.tissue_dir or []),
                          *(args.lesion_dir or []), *(args.csaw_dir or [])] if p is not None]
    for p in inputs:
        if inside(args.workspace, p):
            return (f"the workspace {args.workspace} lies inside the input folder {p}; inputs are never written to. "
                    "Choose a workspace outside it.")
    return None


def _zips_by_kind(args: argparse.Namespace, workspace: Path, report: Report) -> dict[str, list[Path]]:
    """The zips of each kind ("cbis", "mini1", "mini2", "tissue"): ``--zips-dir``'s by name (an unrecognised name is
    reported as skipped; a kind given by its own flag wins), the explicit flags, the ``--tissue-url`` download.

    Raises:
        RuntimeError: the download failed.
    """
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
            zips[kind].append(z)
    if args.tissue_url:
        zips["tissue"].append(download(args.tissue_url, workspace / "_downloads"))
    return zips


def _source_folders(args: argparse.Namespace, zips: dict[str, list[Path]], workspace: Path,
                    report: Report) -> _Folders:
    """The folders given, plus each zip extracted into ``workspace / "_extracted"`` (a zip that cannot be extracted
    is a report error); ``--cbis-dir`` comes after the extracted CBIS-DDSM folders."""
    folders = _Folders(tissue=list(args.tissue_dir or []), lesion=list(args.lesion_dir or []),
                       mini=[(d, False) for d in args.mini_ddsm_dir or []])
    for kind in ("cbis", "mini1", "mini2", "tissue"):
        for z in zips.get(kind, []):
            try:
                folder = extract_zip(z, workspace / "_extracted", kind, report)
            except (zipfile.BadZipFile, OSError) as exc:
                report.error(f"cannot extract {z}: {exc}")
                continue
            if kind == "cbis":
                folders.cbis.append((folder, _cbis_csvs_for(folder, args.cbis_csv or [])))
            elif kind == "tissue":
                folders.tissue.append(folder)
            else:
                folders.mini.append((folder, kind == "mini2"))
    if args.cbis_dir:
        folders.cbis.append((args.cbis_dir, [_cbis_csv_path(c, args.cbis_dir) for c in args.cbis_csv or []]))
    return folders


def _collect_samples(args: argparse.Namespace, folders: _Folders, report: Report) -> tuple[list[Sample], list[Sample]]:
    """The tissue and the lesion samples of every source, one sample per output name
    (``workspace.drop_duplicate_outputs``)."""
    tissue: list[Sample] = []
    lesion: list[Sample] = []
    tol = args.mask_aspect_tolerance
    for d in folders.tissue:
        tissue += tissue_samples(d, "ddsm_tissue", report)
    for d in folders.lesion:
        lesion += lesion_dir_samples(d, report, tol)
    holdout = _csaw_holdout(args.csaw_holdout)
    for d in args.csaw_dir or []:
        tissue += csaw_samples(d, holdout, report)
    for d, csvs in folders.cbis:
        csvs = csvs or find_cbis_csvs(d)
        if not csvs:
            report.error(f"CBIS-DDSM folder {d}: no description CSV found (pass --cbis-csv)")
            continue
        lesion += cbis_samples(d, csvs, args.abnormality, tol, report)
    if folders.mini:
        records = [r for d, mttm in folders.mini for r in mini_records(d, report, mttm)]
        lesion += mini_samples(records, args.include_normals, tol, report)
    if args.synthetic:
        syn = synthetic_samples(args.synthetic, args.seed)
        tissue += [s for s in syn if s.kind == "tissue"]
        lesion += [s for s in syn if s.kind == "lesion"]
    return drop_duplicate_outputs(tissue, report), drop_duplicate_outputs(lesion, report)


def _write_workspace(args: argparse.Namespace, tissue: list[Sample], lesion: list[Sample], report: Report,
                     start: float) -> int:
    """Write the images, the tables, ``prepare_report.json`` and the ``--archive``; ``start``: the run's
    ``time.perf_counter()``. Returns main's exit code (2 when a table holds other rows and no ``--overwrite``)."""
    workspace: Path = args.workspace
    manifest = Manifest(workspace / ".prepare_manifest.json")
    tissue_rows = process_samples(tissue, workspace, manifest, report, "tissue")
    lesion_rows = process_samples(lesion, workspace, manifest, report, "lesion")
    tissue_df = assign_splits(make_table(tissue_rows, TISSUE_COLUMNS), args.val_fraction, args.seed)
    lesion_df = assign_splits(make_table(lesion_rows, LESION_COLUMNS), args.val_fraction, args.seed)
    tables = [(df, workspace / name) for df, name in ((tissue_df, "tissue_dataset.csv"),
                                                      (lesion_df, "unified_segmentation_dataset.csv")) if len(df)]
    conflicts = [text for text in (table_conflict(df, path, args.overwrite) for df, path in tables) if text]
    if conflicts:
        return common.usage_error("; ".join(conflicts) + "; nothing was replaced (images prepared so far stay cached "
                                  "in the workspace)")
    for df, path in tables:
        atomic_write_bytes(path, csv_bytes(df))

    report_data = report_record(vars(args), tissue_df, lesion_df, report, time.perf_counter() - start)
    atomic_write_bytes(workspace / "prepare_report.json",
                       json.dumps(report_data, indent=1, ensure_ascii=False).encode("utf-8"))
    print_summary(report_data)
    if args.archive:
        target = _archive_path(args)
        if target.exists():
            print(f"note: replacing the existing archive {target}")
        archive_workspace(workspace, target)
        print(f"archive: {target}")
    if not len(tissue_df) and not len(lesion_df):
        print("error: no sample could be prepared; see prepare_report.json for the reasons", file=sys.stderr)
        return 1
    return 1 if report.errors else 0


@common.interruptible("prepare_to_train.py", "images finished so far are kept in the workspace, run it again to "
                       "continue")
def main(args: argparse.Namespace | None = None) -> int:
    """Build the workspace. Returns 0 on success, 1 when a source could not be used at all, 2 on bad usage (one line
    on stderr naming the file or flag, what is wrong and the fix, before any work: :func:`_usage_problem`)."""
    args = get_args_parser().parse_args() if args is None else args
    start = time.perf_counter()
    problem = _usage_problem(args)
    if problem:
        return common.usage_error(problem)
    workspace: Path = args.workspace
    workspace.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(workspace)
    if removed:
        print(f"removed {removed} temporary file(s) left by an interrupted run")
    report = Report()
    try:  # 1. zips and downloads -> extracted folders (cached in the workspace)
        zips = _zips_by_kind(args, workspace, report)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    folders = _source_folders(args, zips, workspace, report)
    tissue, lesion = _collect_samples(args, folders, report)  # 2. samples of every source
    return _write_workspace(args, tissue, lesion, report, start)  # 3. images, then the tables and the report


if __name__ == "__main__":
    sys.exit(main())
