"""Model files: one stage's weights alone in a ``.safetensors`` file, its settings in the file's metadata; the default
model the suite ships in ``weights/``.

A checkpoint (``checkpoints.py``) is a pickle-free ``torch.save`` archive in float32, made for training and resuming;
a *model file* is what a release ships: the weights only, in float16 (half the size: about 59 MB for a ResNet34
ACA-ASPP ResUNet of 29.6 M parameters), in the `safetensors <https://huggingface.co/docs/safetensors>`_ layout
(an 8-byte little-endian header length, a JSON header naming every tensor's dtype, shape and byte range, then the
raw bytes: reading one runs no code), so any tool can read it without this suite or PyTorch.

Written by :func:`export_weights` (``scripts/export_weights.py`` for both stages), read by :func:`load_weights` into a
dict shaped like the one ``checkpoints.load_checkpoint`` returns for a lean checkpoint, so that
``checkpoints.model_from_checkpoint`` rebuilds the model from it; ``checkpoints.load_checkpoint`` itself reads these
files (it dispatches on the suffix or the header, :func:`is_weights_file`), so every user of a checkpoint
(``runners.load_runner`` under either backend, with its ONNX export cache keyed by the file's SHA-256,
``cascade_inference.py``, ``evaluate.py``, ``benchmark.py``, ``onnx_backend.py``) takes a ``.safetensors`` file wherever
it takes a ``.pth``.

Tensors: the model's ``state_dict`` (no ``module.`` prefix); floating-point tensors stored as float16 (read back as
float32), integer buffers (BatchNorm ``num_batches_tracked``) with their own dtype. A weight beyond float16's range
(|x| > 65504) is refused rather than stored as infinity.

Metadata (safetensors metadata is ``{str: str}``; every value here is a JSON document, so ``"2"`` is the number 2 and
``"\\"abc\\""`` the string abc; NaN and infinity are written as ``null``):

======================  ============================================================================================
key                     value
======================  ============================================================================================
``format``              :data:`WEIGHTS_FORMAT`, ``"mammo_cascade.weights/1"``: this layout, name and version
``stage``               1 (tissue) or 2 (lesion)
``model_config``        dict for ``models.build_model``
``preprocess_config``   dict for ``imaging.preprocess``
``class_names``         list of str
``input_size``          [height, width] of the network input, pixels
``roi``                 stage 2: the ROI settings it was trained with (``margin_fraction``)
``lesion_threshold``    stage 2, optional: the lesion probability threshold inference and evaluation use when the
                        user gives no ``--threshold``
``min_lesion_area``     stage 2, optional: the smallest lesion component in pixels, used when the user gives no
                        ``--min-lesion-area``
``val_metrics``,        from the checkpoint when it has them: the validation metrics of the saved epoch, the best
``best_metric``,        validation metric and its name, the epoch (1-based), the checkpoint format version, the
``metric_name``,        library versions it was trained with
``epoch``,
``format_version``,
``versions``
(anything else)         the exporter's ``extra_metadata``; ``scripts/export_weights.py`` writes ``training_data``,
                        ``recipe`` (the training command), ``commit`` (``git rev-parse HEAD``, null outside a git
                        checkout), ``date`` (UTC, ISO 8601) and ``source_checkpoint`` (file name and SHA-256)
======================  ============================================================================================

:func:`load_weights` returns every key of the table above ``(anything else)`` at the top level (as a checkpoint holds
them) and the rest, ``format`` included, under ``metadata``.

The shipped default model: :data:`DEFAULT_WEIGHTS_DIR` (``<repository>/weights``, or the folder named by the
environment variable :data:`WEIGHTS_DIR_ENV`) holds ``stage1.safetensors`` and ``stage2.safetensors``
(:data:`DEFAULT_WEIGHTS_NAMES`); ``cascade_inference.py`` and ``evaluate.py`` use them for a stage given no weights
(:func:`default_weights`, :func:`default_weights_note`), and take the stage-2 model's ``lesion_threshold`` /
``min_lesion_area`` when the user gives none (:func:`lesion_settings`).

Imports: reading the metadata (:func:`read_settings`, :func:`is_weights_file`) parses the JSON header with the
standard library only; :func:`load_weights` and :func:`export_weights` import PyTorch and ``safetensors`` when called.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from mammo.core import fileio

#: Name and version of the metadata layout above; written as the ``format`` entry.
WEIGHTS_FORMAT_NAME, WEIGHTS_FORMAT_VERSION = "mammo_cascade.weights", 1
WEIGHTS_FORMAT = f"{WEIGHTS_FORMAT_NAME}/{WEIGHTS_FORMAT_VERSION}"
WEIGHTS_SUFFIX = ".safetensors"

#: The shipped default model's folder (override: the environment variable :data:`WEIGHTS_DIR_ENV`).
DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parents[2] / "weights"  # mammo/weights/ -> the checkout's weights/
WEIGHTS_DIR_ENV = "MAMMO_WEIGHTS_DIR"
DEFAULT_WEIGHTS_NAMES = {1: "stage1.safetensors", 2: "stage2.safetensors"}

#: Metadata keys every model file holds (beside ``format``).
REQUIRED_KEYS = ("stage", "model_config", "preprocess_config", "class_names", "input_size")
#: Checkpoint keys copied into the metadata when the checkpoint has them, and returned at the top level again.
OPTIONAL_KEYS = ("roi", "lesion_threshold", "min_lesion_area", "val_metrics", "best_metric", "metric_name", "epoch",
                 "format_version", "versions")

_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
_FLOAT16_OVERFLOW = 65520.0  # the smallest magnitude float16 rounds to infinity


class WeightsFileError(ValueError):
    """A file that is not a model file of this suite (not safetensors, no or bad metadata, another stage), or a
    checkpoint that cannot be stored as one; the message is one line naming the file and the fix."""


# ------------------------------------------------------------------------------------------------------ reading
def starts_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file of ``size`` bytes whose first bytes are ``head`` (at least 9 of them) starts like a safetensors
    file: an 8-byte little-endian header length that fits in the file, then ``{`` (the safetensors format: header
    length, JSON header, tensor data)."""
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 2 <= length <= min(_MAX_HEADER_BYTES, size - 8) and head[8:9] == b"{"


def is_weights_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is to be read as a model file: its suffix is ``.safetensors`` (any case), or it starts like
    one (:func:`starts_like_safetensors`). False for a missing or unreadable file, a zip-based ``.pth`` checkpoint
    and an ONNX model."""
    path = Path(path)
    if path.suffix.lower() == WEIGHTS_SUFFIX:
        return True
    try:
        with open(path, "rb") as stream:
            head = stream.read(9)
        size = os.path.getsize(path)
    except OSError:
        return False
    return starts_like_safetensors(head, size)


def _fix(path: Path) -> str:
    return (f"{path} must be a stage model file written by scripts/export_weights.py (or a .pth checkpoint of this "
            "suite); export it again")


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file (tensor entries and ``__metadata__``)."""
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found; export one with scripts/export_weights.py or pass the "
                                "right path")
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= length <= min(_MAX_HEADER_BYTES, size - 8):
            raise WeightsFileError(f"{path} is not a safetensors file (its first 8 bytes are no header length that "
                                   f"fits its {size} bytes); {_fix(path)}")
        raw = stream.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise WeightsFileError(f"{path} is not a safetensors file (its header is not a JSON object); {_fix(path)}")
    return header


def read_settings(path: str | os.PathLike, stage: int | None = None) -> dict:
    """A model file's settings, read from its header only (no tensor is read, PyTorch is not imported).

    Args:
        path: a ``.safetensors`` file written by :func:`export_weights`.
        stage: the stage expected (1 or 2), or None for either.

    Returns:
        ``{"stage": int, "model_config": dict, "preprocess_config": dict, "class_names": list[str],
        "input_size": [h, w], ...}``: :data:`REQUIRED_KEYS` and those of :data:`OPTIONAL_KEYS` the file holds, as
        JSON types (``best_metric`` None when it was not finite), plus ``"metadata"``: every other entry
        (``format``, ``training_data``, ``recipe``, ``commit``, ``date``, ...). No ``"model"`` key.

    Raises:
        FileNotFoundError: no file at ``path``.
        WeightsFileError: not a safetensors file, no metadata of this suite (or another format version), a metadata
            value that is not JSON, a missing required key, or another stage than ``stage``.
    """
    path = Path(path)
    metadata = _read_header(path).get("__metadata__")
    if not isinstance(metadata, dict) or "format" not in metadata:
        raise WeightsFileError(f"{path} is a safetensors file without this suite's metadata (no 'format' entry); "
                               f"{_fix(path)}")
    decoded = {}
    for key, value in metadata.items():
        try:
            decoded[key] = json.loads(value)
        except (TypeError, ValueError):
            raise WeightsFileError(f"{path}: its metadata entry {key!r} is not JSON; {_fix(path)}") from None
    found = decoded["format"]
    if found != WEIGHTS_FORMAT:
        raise WeightsFileError(f"{path} holds metadata format {found!r}, not {WEIGHTS_FORMAT!r} that this version of "
                               f"the suite reads; {_fix(path)}")
    missing = [key for key in REQUIRED_KEYS if key not in decoded]
    if missing:
        raise WeightsFileError(f"{path}: its metadata lacks {', '.join(missing)}; {_fix(path)}")
    held = decoded["stage"]
    if held not in (1, 2):
        raise WeightsFileError(f"{path}: its metadata names stage {held!r}, not 1 or 2; {_fix(path)}")
    if stage is not None and held != stage:
        raise WeightsFileError(f"{path} holds the stage-{held} model, not stage {stage}; pass the stage-{stage} file "
                               f"(e.g. {DEFAULT_WEIGHTS_NAMES[stage]})")
    settings = {key: decoded.pop(key) for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if key in decoded}
    settings["metadata"] = decoded
    return settings


def load_weights(path: str | os.PathLike, stage: int | None = None, map_location="cpu") -> dict:
    """Read a model file into a dict shaped like a lean checkpoint (``checkpoints.load_checkpoint``).

    Args:
        path: a ``.safetensors`` file written by :func:`export_weights`.
        stage: the stage expected (1 or 2), or None for either.
        map_location: the device the tensors go to (default the CPU).

    Returns:
        :func:`read_settings`'s dict plus ``"model"``: the ``state_dict``, floating-point tensors as float32 (from the
        float16 on disk), integer buffers in their stored dtype. ``checkpoints.model_from_checkpoint`` builds the
        model from it.

    Raises:
        FileNotFoundError: no file at ``path``.
        WeightsFileError: anything :func:`read_settings` refuses, or tensor data that cannot be read (truncated,
            corrupt).
    """
    path = Path(path)
    checkpoint = read_settings(path, stage)
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        first = str(error).splitlines()[0] if str(error) else ""
        raise WeightsFileError(f"{path}: its tensors cannot be read ({type(error).__name__}: {first}); the file is "
                               "truncated or corrupt: copy or export it again") from None
    model = {}
    for name, tensor in tensors.items():
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        model[name] = tensor if str(map_location) == "cpu" else tensor.to(map_location)
    checkpoint["model"] = model
    return checkpoint


# ------------------------------------------------------------------------------------------------------ writing
def export_weights(checkpoint: dict, path: str | os.PathLike, extra_metadata: dict | None = None, *,
                   overwrite: bool = True) -> Path:
    """Write a stage checkpoint's model as a float16 safetensors model file with its settings (see the module
    docstring), atomically (``fileio.atomic_writer``: a temporary file then ``os.replace``; a crash leaves no
    half-written file).

    Args:
        checkpoint: a checkpoint dict (``checkpoints.load_checkpoint`` of a ``.pth``, lean or full, or a dict from
            :func:`load_weights`, whose ``metadata`` is carried over under ``extra_metadata``). The training state
            (optimizer, scheduler, scaler, RNG) and ``args`` are not written.
        path: the file to write (parent folders are created).
        extra_metadata: more metadata entries, plain JSON types (``training_data``, ``recipe``, ``commit``,
            ``date``, ...); they may not reuse a key of the settings (the table in the module docstring).
        overwrite: when False, an existing file is an error.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: the checkpoint lacks a required key or has no stage 1 or 2, an extra key is reserved, or a
            weight does not fit in float16 (:class:`WeightsFileError` for the last two).
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    missing = [key for key in ("model", *REQUIRED_KEYS) if key not in checkpoint]
    if missing:
        raise ValueError(f"not a stage checkpoint of this suite: it lacks {', '.join(missing)}")
    if checkpoint["stage"] not in (1, 2):
        raise ValueError(f"checkpoint stage must be 1 or 2, not {checkpoint['stage']!r}")
    import torch
    from safetensors.torch import save

    tensors = {}
    for name, value in checkpoint["model"].items():
        tensor = value.detach().cpu()
        if tensor.is_floating_point():
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0  # NaN / inf when the weight holds them
            if math.isfinite(peak) and peak >= _FLOAT16_OVERFLOW:
                raise WeightsFileError(f"weight {name} has values beyond float16's range (|x| > 65504, max "
                                       f"{peak:g}); it cannot be shipped as float16")
            tensor = tensor.to(torch.float16)
        tensors[name.removeprefix("module.")] = tensor.contiguous().clone()  # own storage: safetensors refuses sharing
    metadata = {"format": WEIGHTS_FORMAT}
    metadata.update({key: checkpoint[key] for key in (*REQUIRED_KEYS, *OPTIONAL_KEYS) if key in checkpoint})
    extra = {k: v for k, v in dict(checkpoint.get("metadata") or {}).items() if k != "format"}
    extra.update(extra_metadata or {})
    reserved = sorted(set(extra) & {*metadata, "metadata", "model", "__metadata__"})
    if reserved:
        raise WeightsFileError(f"extra metadata may not set {', '.join(reserved)}: reserved for the settings")
    metadata.update(extra)
    encoded = {str(key): json.dumps(fileio.json_safe(value), allow_nan=False) for key, value in metadata.items()}
    return fileio.atomic_write_bytes(path, save(tensors, metadata=encoded), overwrite)


# ------------------------------------------------------------------------------------------- the shipped default
def weights_dir() -> Path:
    """The folder of the shipped default model: ``$MAMMO_WEIGHTS_DIR`` when set (not empty), else
    :data:`DEFAULT_WEIGHTS_DIR`."""
    override = os.environ.get(WEIGHTS_DIR_ENV, "").strip()
    return Path(override).expanduser() if override else DEFAULT_WEIGHTS_DIR


def default_weights(stage: int) -> Path:
    """The shipped model file of ``stage`` (1 or 2) in :func:`weights_dir`; it may not exist."""
    return weights_dir() / DEFAULT_WEIGHTS_NAMES[stage]


def display_path(path: str | os.PathLike) -> str:
    """``path`` for messages: relative to the working folder when it lies inside it (``weights/stage1.safetensors``
    from the repository root), else absolute."""
    path = Path(path).absolute()
    try:
        return path.relative_to(Path.cwd()).as_posix()
    except ValueError:
        return str(path)


def missing_default_note(stage: int) -> str:
    """The end of the message for a stage given no weights when the shipped file is absent."""
    return f"the shipped default model {display_path(default_weights(stage))} is missing"


def default_weights_note(path: str | os.PathLike, stage: int | None = None) -> str:
    """One console line saying that the shipped default model file ``path`` is used, with its provenance:
    ``using the shipped default model weights/stage1.safetensors (trained on ..., commit 0123456789ab, 2025-01-31)``
    (the parts the file's metadata holds; "no provenance recorded" when it holds none of them).

    Raises:
        FileNotFoundError / WeightsFileError: as :func:`read_settings` (so a damaged shipped file, or one of the other
            stage, is reported before anything runs).
    """
    metadata = read_settings(path, stage)["metadata"]
    details = []
    if metadata.get("training_data"):
        details.append(f"trained on {metadata['training_data']}")
    if metadata.get("commit"):
        details.append(f"commit {str(metadata['commit'])[:12]}")
    if metadata.get("date"):
        details.append(str(metadata["date"])[:10])
    return f"using the shipped default model {display_path(path)} ({', '.join(details) or 'no provenance recorded'})"


#: The stage-2 post-processing of a run when neither the user nor the stage-2 model file gives a value: lesion
#: probability threshold 0.5 (the usual cut of a sigmoid output) and smallest lesion component 1 pixel (every
#: component counts). One pair for inference and evaluation: until issue 18 evaluation used 10 px and other ranges.
DEFAULT_LESION_THRESHOLD, DEFAULT_MIN_LESION_AREA_PX = 0.5, 1

#: The one valid range of each setting, as the messages write it.
THRESHOLD_RANGE_TEXT, MIN_AREA_RANGE_TEXT = "a probability in (0, 1)", "a whole number of pixels >= 1"


def valid_lesion_threshold(value: object) -> bool:
    """Whether ``value`` can be a lesion probability threshold: a real number strictly between 0 and 1 (0 would keep
    every pixel, 1 only saturated ones)."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and 0.0 < value < 1.0)


def valid_min_lesion_area(value: object) -> bool:
    """Whether ``value`` can be the smallest lesion component: a whole number of pixels >= 1."""
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and float(value).is_integer() and value >= 1)


@dataclass(frozen=True)
class LesionSettings:
    """The stage-2 post-processing a run uses.

    Attributes:
        threshold: lesion probability threshold in (0, 1): a pixel with p >= threshold is lesion.
        min_area_px: smallest lesion component counted, pixels (>= 1; 8-connected components).
        from_model: the model-file keys the values came from (``"lesion_threshold"``, ``"min_lesion_area"``).
    """

    threshold: float
    min_area_px: int
    from_model: tuple[str, ...] = ()


def resolve_lesion_settings(checkpoint: dict | None, threshold: float | None = None,
                            min_area: int | None = None) -> LesionSettings:
    """The lesion threshold and smallest component of a run, resolved in one place for every script: the user's
    value, else the stage-2 model's (``lesion_threshold`` / ``min_lesion_area`` in its checkpoint or model file),
    else :data:`DEFAULT_LESION_THRESHOLD` / :data:`DEFAULT_MIN_LESION_AREA_PX`.

    Args:
        checkpoint: the stage-2 checkpoint dict (or ONNX settings), or None (no stage-2 model).
        threshold, min_area: the user's values (None: not given); the command lines check them with the same rules
            (:func:`valid_lesion_threshold`, :func:`valid_min_lesion_area`) when parsing.

    Raises:
        ValueError: a user value outside its range (the message names the flag).
        WeightsFileError: the model's value is outside its range (the message says to pass the flag).
    """
    checkpoint = checkpoint or {}
    given = {"lesion_threshold": threshold, "min_lesion_area": min_area}
    rules = {"lesion_threshold": ("--threshold", valid_lesion_threshold, THRESHOLD_RANGE_TEXT),
             "min_lesion_area": ("--min-lesion-area", valid_min_lesion_area, MIN_AREA_RANGE_TEXT)}
    taken = []
    for key, (flag, valid, text) in rules.items():
        if given[key] is not None:
            if not valid(given[key]):
                raise ValueError(f"{flag} {given[key]!r} is not {text}")
        elif checkpoint.get(key) is not None:
            if not valid(checkpoint[key]):
                raise WeightsFileError(f"the stage-2 model's {key} {checkpoint[key]!r} is not {text}; pass {flag}")
            given[key] = checkpoint[key]
            taken.append(key)
    threshold, min_area = given["lesion_threshold"], given["min_lesion_area"]
    return LesionSettings(float(DEFAULT_LESION_THRESHOLD if threshold is None else threshold),
                          int(DEFAULT_MIN_LESION_AREA_PX if min_area is None else min_area), tuple(taken))
