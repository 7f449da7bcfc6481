"""The inputs of a run: the files of a folder as :class:`InputItem` s, their shares under torchrun, those already done.

What lives here: :data:`IMAGE_SUFFIXES`, :class:`InputItem` (one input file and where its outputs go),
:func:`list_inputs` (unique output stems), :func:`shard` / :func:`merge_shards` (one share per torchrun rank, put back
in input order) and :func:`mark_existing` (inputs whose ``<stem>.json`` exists).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mammo import imaging
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
    status: str = "pending"  # pending / ok / failed / exists / not_image
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


def list_inputs(image_dir: Path, recursive: bool, output_dir: Path) -> list[InputItem]:
    """Candidate files of a folder (sorted; hidden files and anything under ``output_dir`` left out).

    Files with an image suffix (:data:`IMAGE_SUFFIXES`) or image magic bytes are ``pending``; other files are
    ``not_image`` with the reason. Output stems are unique per output folder.
    """
    output_dir = output_dir.resolve()
    pattern = image_dir.rglob("*") if recursive else image_dir.iterdir()
    files = []
    for path in pattern:
        relative = path.relative_to(image_dir)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        resolved = path.resolve()
        if resolved == output_dir or output_dir in resolved.parents:
            continue
        files.append(path)
    files.sort(key=lambda p: p.relative_to(image_dir).as_posix())
    items = []
    for path in files:
        relative = path.relative_to(image_dir)
        item = InputItem(path, relative.as_posix(), output_dir / relative.parent, path.stem)
        if path.suffix.lower() not in IMAGE_SUFFIXES and not looks_like_image(path):
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


def mark_existing(items: list[InputItem]) -> list[InputItem]:
    """Mark each pending item whose ``<stem>.json`` exists as ``exists`` (its record read back when it is valid).

    Returns:
        The items marked, in order (the caller reports them; with ``--overwrite`` it does not call this).
    """
    marked = []
    for item in items:
        if item.status == "pending" and (item.out_dir / f"{item.stem}.json").exists():
            item.status, item.reason = "exists", "outputs exist (pass --overwrite to redo)"
            try:
                item.record = json.loads((item.out_dir / f"{item.stem}.json").read_text(encoding="utf-8"))
                if validate_record(item.record):
                    item.record = None
            except (OSError, ValueError):
                item.record = None
            marked.append(item)
    return marked
