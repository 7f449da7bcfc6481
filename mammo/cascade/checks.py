"""A user's paths and numbers, checked before any work: one-line errors that name the file, what is wrong and the fix.

The scripts' ``main`` functions (through :mod:`mammo.training.inputs` and :mod:`mammo.evaluation.cases` where the
work lives) check every path flag with these functions before they start, so that a wrong file costs a line on stderr
and exit code 2, not a traceback or an hour of training first:

- :func:`input_file`, :func:`input_folder`: exists, and is a file / a folder (the message says what it is instead:
  :func:`describe`);
- :func:`output_folder`, :func:`output_file`: not a file where a folder goes, not a folder where a file goes;
  :func:`writable_folder` adds that a file can be written there (a probe file, removed at once);
- :func:`checkpoint_file` (cheap: no loading) and :func:`load_stage_checkpoint` (loads, checks the stage): a folder,
  a text file, an image, an empty file, an ONNX model where a ``.pth`` checkpoint is expected, or a checkpoint of the
  other stage; :func:`load_stage_pair` adds the advice for two checkpoints given together
  (``cascade.stage_mismatch``: swapped, or two of one stage);
- :func:`number`: a number outside its range (or NaN).

Each raises :class:`UserInputError` (a ``ValueError``) whose message is one line; :func:`one_line` folds the message
of any other error into one line for printing.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from pathlib import Path

from mammo import cascade
from mammo.weights import checkpoints
from mammo import imaging
from mammo.weights import release


class UserInputError(ValueError):
    """A user's mistake on the command line; the message is one line naming the file or flag, what is wrong and the
    fix."""


def one_line(text: object) -> str:
    """``text`` with its lines joined by spaces (blank lines dropped): what a script prints after ``error:``."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


# ----------------------------------------------------------------------------------------------------------------
# What a path is
# ----------------------------------------------------------------------------------------------------------------
def describe(path: str | os.PathLike) -> str:
    """What is at ``path``, for messages: "missing", "a folder", "an empty file", "a PNG image", "a text file",
    "a PyTorch checkpoint", "a zip archive", "a spreadsheet", "an ONNX model", "a safetensors model file" or "a binary
    file"."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "a folder"
    try:
        with open(path, "rb") as stream:
            head = stream.read(512)
    except OSError as error:
        return f"unreadable ({error.strerror or type(error).__name__})"
    if not head:
        return "an empty file"
    found = imaging.image_format(head)
    if found:
        return f"a {found.upper()} image"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError):
            return "a damaged zip archive"
        if any(name.endswith("data.pkl") for name in names):
            return "a PyTorch checkpoint"
        if "[Content_Types].xml" in names:
            return "a spreadsheet or office document"
        return "a zip archive"
    if path.suffix.lower() == ".onnx":
        return "an ONNX model"
    if release.starts_like_safetensors(head, path.stat().st_size):
        return "a safetensors model file"
    return "a text file" if imaging.looks_like_text(head) else "a binary file"


# ----------------------------------------------------------------------------------------------------------------
# Inputs and outputs
# ----------------------------------------------------------------------------------------------------------------
def input_file(path: str | os.PathLike, flag: str, fix: str) -> Path:
    """``path`` as a :class:`Path` when it is an existing file.

    Raises:
        UserInputError: missing, or a folder (``fix`` ends the message: what to pass instead).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{flag} {path} does not exist; {fix}")
    if path.is_dir():
        raise UserInputError(f"{flag} {path} is a folder, not a file; {fix}")
    return path


def input_folder(path: str | os.PathLike, flag: str, fix: str) -> Path:
    """``path`` as a :class:`Path` when it is an existing folder.

    Raises:
        UserInputError: missing, or a file (the message says what kind: a zip, a CSV, ...; ``fix`` ends it).
    """
    path = Path(path)
    if not path.exists():
        raise UserInputError(f"{flag} {path} does not exist; {fix}")
    if not path.is_dir():
        raise UserInputError(f"{flag} {path} is {describe(path)}, not a folder; {fix}")
    return path


def output_folder(path: str | os.PathLike, flag: str) -> Path:
    """``path`` when a folder can be there (it exists as a folder, or nothing on the way to it is a file).

    Raises:
        UserInputError: ``path`` or one of its parents is a file.
    """
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                where = "" if place == path else f" (its parent {place} is a file)"
                raise UserInputError(f"{flag} {path} cannot be a folder{where}: {place} is {describe(place)}; "
                                     "choose a folder (it is created if missing)")
            break
    return path


def writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """``path`` when files can be written in it: :func:`output_folder`'s checks, then a probe file created and removed
    at once in the folder or, when it does not exist yet, in its nearest existing parent (where it would be made).
    Nothing is created or left behind; a read-only mount, a folder without write permission, a full disk or a
    special file system (``/sys``, ``/proc``) is found before any work, also for root (whom permissions do not stop).

    Raises:
        UserInputError: ``path`` or one of its parents is a file, or the folder refuses a new file (the message names
            the folder, the system's reason and the fix).
    """
    path = output_folder(path, flag)
    place = next((p for p in (path, *path.parents) if p.is_dir()), Path("."))
    try:
        handle, probe = tempfile.mkstemp(prefix=".write_test_", dir=place)
    except OSError as error:
        where = "" if place == path else f" (it would be created in {place})"
        reason = (error.strerror or type(error).__name__).lower()
        raise UserInputError(f"{flag} {path} cannot be written{where}: {reason}; choose a folder you can write "
                             "to") from None
    os.close(handle)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return path


def output_file(path: str | os.PathLike, flag: str, example: str = "out") -> Path:
    """``path`` when a file can be written there (not a folder, and no parent is a file).

    Args:
        example: a file name the message proposes inside the folder given by mistake.

    Raises:
        UserInputError: ``path`` is a folder, or one of its parents is a file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserInputError(f"{flag} {path} is a folder; pass a file name (e.g. {path / example})")
    output_folder(path.parent, f"{flag} {path}: the folder")
    return path


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------------------
def checkpoint_file(path: str | os.PathLike, flag: str, stage: int, *, allow_onnx: bool = False,
                    advice: str | None = None) -> Path:
    """``path`` when it may be a stage checkpoint (cheap checks, nothing loaded).

    Args:
        path: the file given.
        flag: the command-line flag it came from (``--stage1-weights``), for messages.
        stage: the stage expected (1 or 2), for the advice.
        allow_onnx: an ``.onnx`` file is accepted (runs under ONNX Runtime).
        advice: what to pass instead, ending the messages (default: the stage-``stage`` checkpoint).

    Raises:
        UserInputError: missing, a folder (the message names the checkpoint inside it when there is one), an empty
            file, an image, a text file, a spreadsheet or zip archive, or an ONNX model where only ``.pth`` goes.
    """
    path = Path(path)
    wanted = advice or (f"pass the stage-{stage} checkpoint (best_stage{stage}.pth, written by "
                        f"cascade_segmentation_model.py, or weights/stage{stage}.safetensors)")
    if not path.exists():
        raise UserInputError(f"{flag} {path} does not exist; {wanted}")
    if path.is_dir():
        inside = [c for c in (path / f"best_stage{stage}.pth", path / f"stage{stage}" / f"best_stage{stage}.pth")
                  if c.is_file()]
        if inside:
            raise UserInputError(f"{flag} {path} is a folder; pass the checkpoint file inside it: {inside[0]}")
        raise UserInputError(f"{flag} {path} is a folder without best_stage{stage}.pth, not a checkpoint file; "
                             f"{wanted}")
    if path.suffix.lower() == ".onnx":
        if allow_onnx:
            return path
        raise UserInputError(f"{flag} {path} is an ONNX model; pass the .pth checkpoint it was exported from")
    kind = describe(path)
    if kind == "an empty file":
        raise UserInputError(f"{flag} {path} is an empty file (0 bytes), not a checkpoint: an interrupted copy or "
                             f"download? Copy it again, or {wanted}")
    if kind.endswith(" image") or kind in ("a text file", "a spreadsheet or office document", "a zip archive"):
        raise UserInputError(f"{flag} {path} is {kind}, not a checkpoint; {wanted}")
    return path


def load_stage_checkpoint(path: str | os.PathLike, flag: str, stage: int, fix: str = "") -> dict:
    """Load the checkpoint at ``path`` (``checkpoints.load_checkpoint``) after :func:`checkpoint_file`, and check
    that it holds ``stage``.

    Args:
        fix: the advice when it holds the other stage (default: pass a stage-``stage`` checkpoint).

    Returns:
        The checkpoint dict.

    Raises:
        UserInputError: any problem of :func:`checkpoint_file`, a file that is not a checkpoint of this suite, or a
            checkpoint of another stage.
    """
    path = checkpoint_file(path, flag, stage)
    try:
        checkpoint = checkpoints.load_checkpoint(path)
    except (FileNotFoundError, ValueError) as error:
        raise UserInputError(f"{flag}: {one_line(error)}") from None
    found = cascade.checkpoint_stage(checkpoint)
    if found != stage:
        advice = fix or f"pass a stage-{stage} checkpoint (best_stage{stage}.pth)"
        raise UserInputError(f"{flag} {path} is a stage-{found} checkpoint; {advice}")
    return checkpoint


def load_stage_pair(stage1: str | os.PathLike | None, stage2: str | os.PathLike | None,
                    flags: tuple[str, str] = ("--stage1-weights", "--stage2-weights"),
                    ) -> tuple[dict | None, dict | None]:
    """Load the checkpoints given for stage 1 and stage 2 (either may be None) and check them together.

    Returns:
        ``(stage-1 checkpoint or None, stage-2 checkpoint or None)``.

    Raises:
        UserInputError: a file problem (:func:`checkpoint_file`, not a checkpoint), or stages that do not fit, with
            the advice that fits the case (``cascade.stage_mismatch``): swapped, both of one stage, or one of the
            other stage.
    """
    loaded = []
    for stage, path, flag in ((1, stage1, flags[0]), (2, stage2, flags[1])):
        if path is None:
            loaded.append(None)
            continue
        path = checkpoint_file(path, flag, stage)
        try:
            loaded.append(checkpoints.load_checkpoint(path))
        except (FileNotFoundError, ValueError) as error:
            raise UserInputError(f"{flag}: {one_line(error)}") from None
    found = [None if c is None else cascade.checkpoint_stage(c) for c in loaded]
    message = cascade.stage_mismatch(found[0], found[1], None if stage1 is None else str(stage1),
                                     None if stage2 is None else str(stage2), flags)
    if message:
        raise UserInputError(message)
    return loaded[0], loaded[1]


# ----------------------------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------------------------
def number(value: float | int | None, flag: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False) -> None:
    """Check that a number flag lies in its range (None = not given, accepted).

    Args:
        value: the value given.
        flag: the flag, for the message.
        low, high: the bounds (None: unbounded); ``low_open`` / ``high_open`` exclude the bound itself.

    Raises:
        UserInputError: NaN, infinite, or outside the range; the message gives the range and the value.
    """
    if value is None:
        return
    bad = not math.isfinite(float(value))
    if low is not None:
        bad = bad or value < low or (low_open and value == low)
    if high is not None:
        bad = bad or value > high or (high_open and value == high)
    if bad:
        if low is not None and high is not None:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            wanted = f"{'>' if low_open else '>='} {low:g}"
        else:
            wanted = f"{'<' if high_open else '<='} {high:g}"
        raise UserInputError(f"{flag} must be {wanted}, got {value}")
