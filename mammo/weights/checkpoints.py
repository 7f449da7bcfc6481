"""The suite's one checkpoint format: build, write atomically, read safely, rebuild the model; find and identify files.

A checkpoint alone rebuilds its model and its preprocessing: inference, evaluation, ONNX export and stage-2 crop
making take no training flag. Turning a checkpoint into something that runs is :mod:`runners`' job.

Checkpoint format (one dict, plain Python types and tensors only, so ``torch.load(weights_only=True)`` reads it;
written atomically by :func:`save_checkpoint`):

====================  ==========================================================================================
key                   value
====================  ==========================================================================================
``format_version``    int, :data:`CHECKPOINT_FORMAT_VERSION`
``stage``             1 (tissue) or 2 (lesion)
``model``             ``state_dict`` (no ``module.`` prefix)
``model_config``      dict for ``models.build_model``
``preprocess_config`` dict for ``imaging.preprocess``
``class_names``       list of str (stage 1: background, adipose, fgt, pectoral; stage 2: lesion)
``input_size``        [height, width] of the network input, pixels
``epoch``             int, last finished epoch (1-based)
``best_metric``       float, best validation metric so far; ``metric_name`` names it (``val/dice_fgt``)
``optimizer`` ...     ``optimizer``, ``lr_scheduler``, ``scaler`` state dicts (or None), ``rng_state`` (dict):
                      the training state (:data:`TRAINING_STATE_KEYS`), in ``last_stageN.pth`` only
``args``              the training arguments as a dict of plain types
``versions``          library versions (python, torch, smp, numpy, opencv)
``roi``               stage 2 only: the ROI settings it was trained with (``margin_fraction``)
====================  ==========================================================================================

Lean and full checkpoints: training writes ``best_stageN.pth`` and the per-epoch ``stageN_epoch{E}.pth`` without the
training state (:func:`without_training_state`: weights and settings only, about a third of the size with AdamW,
whose two moment buffers per weight are twice the weights); ``last_stageN.pth`` alone keeps it for ``--resume``.
Older checkpoints that hold the training state in every file load everywhere as before.

Model files: the ``.safetensors`` files a release ships (the shipped default model in ``weights/``: float16 weights
and the settings in the metadata, written by ``release.export_weights``) load through :func:`load_checkpoint`
like a lean checkpoint; see ``release.py``.

Imports: reading or writing a ``.pth`` file and rebuilding a model need PyTorch, which the functions here import when
called, not when this module is imported; so :mod:`runners` can run an exported ``.onnx`` model (ONNX Runtime)
without loading PyTorch at all (see ``runners.py``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import platform
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mammo.weights import release
from mammo.core.fileio import atomic_writer, file_sha256
from mammo.core.labels import LESION_CLASS_NAMES, TISSUE_CLASS_NAMES
from mammo.imaging.roi import ROI_MARGIN_FRACTION

if TYPE_CHECKING:  # annotations only: torch is imported by the functions that use it (see the module docstring)
    import torch

CHECKPOINT_FORMAT_VERSION = 1

#: Keys of the training state: needed to resume (``last_stageN.pth``), not to run the model.
TRAINING_STATE_KEYS = ("optimizer", "lr_scheduler", "scaler", "rng_state")

_VERSION_LINE = re.compile(r"^__version__\s*=\s*['\"](?P<version>[^'\"]+)['\"]", re.MULTILINE)


def _version(module: str, distribution: str) -> str:
    """A library's ``__version__`` without importing it when it is not loaded yet (importing torch or
    segmentation_models_pytorch only to read a version would cost seconds and hundreds of MB): read from the
    package's ``version.py`` / ``__version__.py`` (torch's holds the full ``2.14.1+cu130``, the installed
    distribution's metadata only ``2.14.1``), else from the distribution's metadata."""
    loaded = sys.modules.get(module)
    if loaded is not None and hasattr(loaded, "__version__"):
        return str(loaded.__version__)
    spec = importlib.util.find_spec(module)  # finds the package without importing it
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    for file in (Path(folder, name) for folder in folders for name in ("version.py", "__version__.py")):
        found = _VERSION_LINE.search(file.read_text(encoding="utf-8")) if file.is_file() else None
        if found:
            return found["version"]
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def library_versions() -> dict:
    """Versions of the libraries a checkpoint depends on (plain strings)."""
    import cv2

    return {
        "python": platform.python_version(),
        "torch": _version("torch", "torch"),
        "segmentation_models_pytorch": _version("segmentation_models_pytorch", "segmentation_models_pytorch"),
        "numpy": str(np.__version__),
        "opencv": str(cv2.__version__),
    }


def make_checkpoint(*, stage: int, model: torch.nn.Module, model_config: dict, preprocess_config: dict,
                    input_size: tuple[int, int], epoch: int = 0, best_metric: float = float("nan"),
                    metric_name: str = "", optimizer=None, lr_scheduler=None, scaler=None, rng_state: dict | None = None,
                    args: dict | None = None, roi: dict | None = None) -> dict:
    """Assemble the one checkpoint dict of the suite (see the module docstring for the keys).

    ``model`` may be wrapped in ``DistributedDataParallel``; its unwrapped ``state_dict`` is stored. Optimizer,
    scheduler and scaler are stored through their ``state_dict()`` when given. ``args`` must hold plain types.
    """
    model = getattr(model, "module", model)
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, not {stage!r}")
    checkpoint = {
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "stage": stage,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "model_config": dict(model_config),
        "preprocess_config": dict(preprocess_config),
        "class_names": list(TISSUE_CLASS_NAMES if stage == 1 else LESION_CLASS_NAMES),
        "input_size": [int(input_size[0]), int(input_size[1])],
        "epoch": int(epoch),
        "best_metric": float(best_metric),
        "metric_name": metric_name or ("val/dice_fgt" if stage == 1 else "val/dice_lesion"),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "lr_scheduler": lr_scheduler.state_dict() if lr_scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng_state": rng_state or {},
        "args": dict(args or {}),
        "versions": library_versions(),
    }
    if stage == 2:
        checkpoint["roi"] = dict(roi or {"margin_fraction": ROI_MARGIN_FRACTION})
    return checkpoint


def without_training_state(state: dict) -> dict:
    """A shallow copy of checkpoint ``state`` without :data:`TRAINING_STATE_KEYS` (optimizer, scheduler, scaler, RNG
    states): what ``best_stageN.pth`` and ``stageN_epoch{E}.pth`` hold. The model and every setting are kept, so it
    runs, exports and evaluates like the full checkpoint; only ``--resume`` needs the full one."""
    return {k: v for k, v in state.items() if k not in TRAINING_STATE_KEYS}


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (``fileio.atomic_writer``): a crash mid-write leaves the previous file
    intact, never a truncated one. Parent folders are created."""
    import torch

    with atomic_writer(path) as stream:
        torch.save(state, stream)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` with ``weights_only=True`` (lean or full, any version),
    or a float16 ``.safetensors`` model file (``release.load_weights``: recognised by its suffix or header,
    ``release.is_weights_file``; returned like a lean checkpoint, float32 weights, its provenance under
    ``metadata``).

    Raises:
        FileNotFoundError: no file at ``path`` (the message says how to make one).
        ValueError: the file is not a checkpoint of this suite (corrupt, truncated, or another format); for a model
            file, ``release.WeightsFileError`` (a ``ValueError``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found; train one with cascade_segmentation_model.py or pass the right path"
        )
    if release.is_weights_file(path):
        return release.load_weights(path, map_location=map_location)
    import torch

    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types; its advice to unpickle with weights_only=False is unsafe
        raise ValueError(
            f"checkpoint {path} cannot be read: it is corrupt, truncated, or not a PyTorch checkpoint of this suite "
            f"({type(error).__name__}). This suite writes only plain types and tensors, so a file that needs full "
            "unpickling did not come from it; re-download or re-train it") from None
    missing = {"model", "model_config", "preprocess_config", "stage", "input_size"} - set(checkpoint if isinstance(checkpoint, dict) else ())
    if missing:
        raise ValueError(f"{path} is not a checkpoint of this suite: missing keys {sorted(missing)}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model stored in ``checkpoint`` (in eval mode, on ``device``). No training flag is needed."""
    from mammo.nn.models import build_model  # imports torch (see the module docstring)

    config = dict(checkpoint["model_config"])
    if "encoder_weights" in config:
        config["encoder_weights"] = None  # the trained weights come from the state dict, not from ImageNet
    model = build_model(config)
    state = {k.removeprefix("module."): v for k, v in checkpoint["model"].items()}
    model.load_state_dict(state)
    return model.to(device).eval()


def load_stage(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """Load a checkpoint and rebuild its model: returns ``(model in eval mode, checkpoint dict)``."""
    checkpoint = load_checkpoint(path)
    return model_from_checkpoint(checkpoint, device), checkpoint


def find_checkpoint(checkpoint_dir: str | os.PathLike, stage: int) -> Path:
    """Find ``best_stage{stage}.pth`` in ``checkpoint_dir`` or its ``stage{stage}/`` sub-folder.

    Raises:
        FileNotFoundError: neither exists (the message lists where it looked).
    """
    root = Path(checkpoint_dir)
    candidates = [root / f"best_stage{stage}.pth", root / f"stage{stage}" / f"best_stage{stage}.pth"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no stage-{stage} checkpoint in {root}: looked for "
                            + " and ".join(str(c) for c in candidates)
                            + f"; pass --stage{stage}-weights FILE instead")


def checkpoint_identity(path: str | os.PathLike, checkpoint: dict) -> dict:
    """What identifies a checkpoint in reports: path, first 16 hex digits of its SHA-256, stage, epoch, best metric."""
    best = checkpoint.get("best_metric")
    best = None if best is None or not math.isfinite(float(best)) else float(best)
    epoch = checkpoint.get("epoch")
    return {
        "path": str(Path(path).resolve()),
        "sha256_16": file_sha256(path)[:16],
        "stage": int(checkpoint.get("stage", 0)),
        "epoch": None if epoch is None else int(epoch),
        "best_metric": best,
        "metric_name": checkpoint.get("metric_name") or None,
        "input_size": [int(v) for v in checkpoint.get("input_size", [])],
    }
