"""The inputs of a run: the files of a folder as :class:`InputItem` s, their shares under torchrun, those already done.

What lives here: :data:`IMAGE_SUFFIXES`, :class:`InputItem` (one input file and where its outputs go),
:func:`list_inputs` (unique output stems; a broken link listed as failed), :func:`shard` / :func:`merge_shards` (one
share per torchrun rank, put back in input order), :func:`input_identity` (a file's size, time and SHA-256, kept in
each record's ``provenance``) and :func:`mark_existing` (inputs whose ``<stem>.json`` exists: skipped when that record
came from the same file, weights and settings, a ``conflict`` naming the difference otherwise).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mammo import imaging
from mammo.core.fileio import file_sha256
from mammo.inference.record import validate_record

#: File suffixes read as images (the formats ``imaging.read_image`` decodes). Files without a suffix are read when
#: their magic bytes say DICOM / PNG / JPEG / TIFF / BMP / PGM.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".pgm", ".pnm", ".dcm", ".dicom", ".dic")


@dataclass
class InputItem:
    """One input file and where its outputs go."""

    path: Path
    relative: str  # as reported (relative to --image-dir, or the file name)
    out_dir: Path
    stem: str
    status: str = "pending"  # pending / ok / failed / exists / conflict / not_image
    reason: str = ""
    record: dict | None = None
    seconds: float | None = None


def looks_like_image(path: Path) -> bool:
    """Whether a file starts like an image the suite reads (DICOM, PNG, JPEG, TIFF, BMP, PGM magic bytes); True when
    it cannot be opened, so that the reader reports why."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(132)
    except OSError:
        return True  # let the reader report the error
    return imaging.image_format(head) is not None


def _candidates(image_dir: Path, recursive: bool, output_dir: Path) -> list[Path]:
    """The files and broken links of ``image_dir`` (sorted; hidden ones and those under ``output_dir`` left out)."""
    pattern = image_dir.rglob("*") if recursive else image_dir.iterdir()
    found = []
    for path in pattern:
        relative = path.relative_to(image_dir)
        broken = path.is_symlink() and not path.exists()  # a link to nothing (or a loop of links)
        if any(part.startswith(".") for part in relative.parts) or not (broken or path.is_file()):
            continue
        resolved = path.parent.resolve() / path.name if broken else path.resolve()
        if resolved == output_dir or output_dir in resolved.parents:
            continue
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(image_dir).as_posix())


def list_inputs(image_dir: Path, recursive: bool, output_dir: Path) -> list[InputItem]:
    """Candidate files of a folder (sorted; hidden files and anything under ``output_dir`` left out).

    Files with an image suffix (:data:`IMAGE_SUFFIXES`) or image magic bytes are ``pending``; other files are
    ``not_image`` with the reason; a broken symbolic link is ``failed`` with the reason "broken link to <target>".
    Output stems are unique per output folder.
    """
    output_dir = output_dir.resolve()
    items = []
    for path in _candidates(image_dir, recursive, output_dir):
        relative = path.relative_to(image_dir)
        item = InputItem(path, relative.as_posix(), output_dir / relative.parent, path.stem)
        if path.is_symlink() and not path.exists():
            item.status = "failed"
            item.reason = (f"{relative.as_posix()}: broken link to {os.readlink(path)} (nothing there); restore the "
                           "file it points to or remove the link")
        elif path.suffix.lower() not in IMAGE_SUFFIXES and not looks_like_image(path):
            item.status = "not_image"
            item.reason = (f"not an image file (suffix {path.suffix or 'none'!r} and no image header); "
                           f"supported: {', '.join(IMAGE_SUFFIXES)} or DICOM without a suffix")
        items.append(item)
    stems: dict[tuple[Path, str], list[InputItem]] = {}
    for item in items:
        if item.status == "pending":
            stems.setdefault((item.out_dir, item.stem.lower()), []).append(item)
    for group in stems.values():
        if len(group) > 1:
            for item in group:
                item.stem = item.path.name.replace(".", "_")
    return items


def shard(items: list[InputItem], rank: int, world_size: int) -> list[tuple[int, InputItem]]:
    """This process's share of a run's inputs under torchrun: every ``world_size``-th input from ``rank`` on, with
    its index in ``items`` (so that rank 0 can put the run back in input order, :func:`merge_shards`). Each input
    belongs to exactly one rank; its outputs are written by that rank alone."""
    return [(index, item) for index, item in enumerate(items) if index % world_size == rank]


def merge_shards(shards: list[list[tuple[int, InputItem]]]) -> list[InputItem]:
    """The whole run's inputs, in input order, from every rank's :func:`shard` after processing.

    Raises:
        ValueError: the shards do not cover the inputs exactly once (ranks that listed different folders).
    """
    pairs = sorted((pair for part in shards for pair in part), key=lambda pair: pair[0])
    if [index for index, _ in pairs] != list(range(len(pairs))):
        raise ValueError("the processes listed different inputs (was the folder changed while they started?); "
                         "run again")
    return [item for _, item in pairs]


def input_identity(path: str | os.PathLike) -> dict:
    """What identifies an input file (``record["provenance"]["input"]``): its size in bytes, its modification time
    (UTC, ISO 8601 with microseconds) and the full hex SHA-256 of its bytes (``fileio.file_sha256``).

    Raises:
        OSError: the file cannot be read.
    """
    stat = os.stat(path)
    modified = _dt.datetime.fromtimestamp(stat.st_mtime, _dt.timezone.utc).isoformat(timespec="microseconds")
    return {"size_bytes": int(stat.st_size), "modified_utc": modified, "sha256": file_sha256(path)}


#: How a difference in each run setting (``record.run_settings``) is named, with the flag that sets it.
SETTING_NAMES = {"lesion_threshold": "lesion threshold (--threshold)",
                 "min_lesion_area_px": "smallest lesion area in px (--min-lesion-area)",
                 "tta": "test-time augmentation (--tta)", "adaptive_clahe": "adaptive CLAHE (--adaptive-clahe)",
                 "anatomy": "anatomy rules (--no-anatomy turns them off)",
                 "prob_encoding": "probability encoding (--prob-encoding)"}

#: The reason given for a record written before records said what made them (schema versions 1-3).
OLDER_RECORD = ("made by an older version, which did not record the input file, weights and settings; pass "
                "--overwrite to redo it")


def _setting_text(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return "unknown" if value is None else str(value)


def provenance_differences(record: dict, path: Path, identities: dict, settings: dict) -> list[str]:
    """How an existing record differs from what this run would make of ``path``: another input file (the size,
    else the SHA-256, differs), other weights (a stage's ``sha256_16`` in ``record["checkpoints"]`` differs from
    ``identities``, the run's ``LoadedCascade.identities``) or other ``settings`` (``record.run_settings``); each as a
    phrase ("with lesion threshold (--threshold) 0.5 (this run: 0.3)"). A record without ``provenance`` gives
    [:data:`OLDER_RECORD`]. Empty: the record stands for this run.

    Raises:
        OSError: ``path`` cannot be read (its SHA-256 is needed).
    """
    provenance = record.get("provenance")
    if not isinstance(provenance, dict):
        return [OLDER_RECORD]
    made, differences = provenance.get("input") or {}, []
    size = os.stat(path).st_size
    if made.get("size_bytes") != size or made.get("sha256") != file_sha256(path):  # hashed only when sizes agree
        differences.append(f"from another file of that name ({made.get('size_bytes')} bytes, modified "
                           f"{made.get('modified_utc')}, SHA-256 {str(made.get('sha256'))[:16]}...), not from "
                           f"{path} ({size} bytes)")
    for stage in ("stage1", "stage2"):
        old = ((record.get("checkpoints") or {}).get(stage) or {}).get("sha256_16")
        new = identities[stage]["sha256_16"]
        if old != new:
            differences.append(f"with other stage-{stage[-1]} weights (SHA-256 {old}..., this run: {new}...)")
    old_settings = provenance.get("settings") or {}
    for key, value in settings.items():
        if old_settings.get(key) != value:
            differences.append(f"with {SETTING_NAMES.get(key, key)} {_setting_text(old_settings.get(key))} "
                               f"(this run: {_setting_text(value)})")
    return differences


def _judge_existing(item: InputItem, json_path: Path, identities: dict, settings: dict) -> tuple[str, str, dict | None]:
    """``(status, reason, record)`` of a pending input whose ``<stem>.json`` exists (see :func:`mark_existing`)."""
    name = (Path(item.relative).parent / json_path.name).as_posix()
    redo = "not touched; pass --overwrite to redo it (or choose another --output-dir)"
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return "conflict", f"{name} cannot be read ({type(error).__name__}: {error}); {redo}", None
    if not isinstance(record, dict):
        return "conflict", f"{name} is not a record of this suite; {redo}", None
    try:
        differences = provenance_differences(record, item.path, identities, settings)
    except OSError as error:
        return "failed", f"{item.path}: cannot be read ({error.strerror or type(error).__name__})", None
    if differences == [OLDER_RECORD]:
        return "conflict", f"{name} was {OLDER_RECORD}", None
    if differences:
        return "conflict", f"{name} was made " + "; ".join(differences) + f": {redo}", None
    problems = validate_record(record)
    if problems:
        return "conflict", f"{name} is not a valid record ({problems[0]}); {redo}", None
    return "exists", "outputs exist, made from the same file, weights and settings (pass --overwrite to redo)", record


def verdict(item: InputItem) -> str:
    """The status an input is reported with: its own, except that a kept record (``exists``) keeps the verdict it was
    made with when that is ``warning`` or ``rejected`` (a rerun must not turn a rejected image into a plain row)."""
    if item.status == "exists" and item.record and item.record.get("status") in ("warning", "rejected"):
        return item.record["status"]
    return item.status


def verdict_reason(item: InputItem) -> str:
    """The reason reported beside :func:`verdict`: a kept warning or rejection gives its quality reasons."""
    if verdict(item) != item.status:
        reasons = "; ".join((item.record.get("quality") or {}).get("reasons", []))
        return f"kept from an earlier run: {reasons}"
    return item.reason


def mark_existing(items: list[InputItem], identities: dict, settings: dict) -> list[InputItem]:
    """Judge each pending item whose ``<stem>.json`` exists, by what made that record (its ``provenance``).

    The record came from the same file (same SHA-256) with the same weights (``identities``, the run's
    ``LoadedCascade.identities``) and ``settings`` (``record.run_settings``): ``exists``, its record read back (the
    input is skipped). Otherwise ``conflict``, its outputs left as they are, with a reason naming the difference and
    ``--overwrite``: another file of the same name, other weights or settings, a record without provenance (an older
    version), or one that cannot be read. An input that cannot be read to compare is ``failed``.

    Returns:
        The items marked, in order (the caller reports them; with ``--overwrite`` it does not call this).
    """
    marked = []
    for item in items:
        json_path = item.out_dir / f"{item.stem}.json"
        if item.status == "pending" and json_path.exists():
            item.status, item.reason, item.record = _judge_existing(item, json_path, identities, settings)
            marked.append(item)
    return marked
