"""ONNX export of a stage checkpoint: one self-contained ``.onnx`` file, and reading its settings back.

The exported graph has a dynamic batch axis (input ``image`` ``(N, 1, H, W)`` float32 in [0, 1], output ``logits``
``(N, C, H, W)`` float32) and, in the model's metadata, everything else the cascade needs (stage, input size,
preprocessing config, class names, ROI settings, model config; not the optimizer). So
``cascade.Cascade(read_onnx_metadata(p1), read_onnx_metadata(p2), stage1_runner=OnnxRunner(p1),
stage2_runner=OnnxRunner(p2))`` runs the cascade without PyTorch weights; ``runners.load_runner`` does this for a
``.pth`` or an ``.onnx`` path alike. The command line that exports both stages is ``onnx_backend.py``.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. Torch 2.14's default (dynamo) exporter
needs the ``onnxscript`` package, which this suite does not install; the classic exporter needs only ``onnx``,
runs offline and exports these convolutional networks exactly (max |logit difference| to PyTorch ~1e-6, see
``tests/test_onnx_backend.py``). Opset 17 (:data:`ONNX_OPSET`): supported by every onnxruntime >= 1.13.

The spatial size is fixed at the checkpoint's ``input_size`` (the cascade always letterboxes to it); pass
``dynamic_size=True`` to :func:`export_onnx` to also leave H and W free (multiples of 32).

Exporting needs PyTorch (imported by :func:`export_onnx_bytes` when called); reading the settings back
(:func:`read_onnx_metadata`, :func:`settings_from_metadata`) does not, so this module imports without it.
``runners.load_runner`` keeps an export of each ``.pth`` it runs under ONNX Runtime (see ``runners.py``); such a file
also records the checkpoint it came from (metadata ``source``: its SHA-256 and file name).
"""

from __future__ import annotations

import io
import json
import os
import warnings
from pathlib import Path


from mammo.weights import checkpoints
from mammo.core import fileio

#: ONNX opset of the exported graphs (onnxruntime >= 1.13 runs it; everything these networks use exists in it).
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"

#: Key of the ONNX metadata entry holding the checkpoint's settings as JSON (all keys but the weights and the
#: optimizer / scheduler / scaler / RNG states), plus the export's ``opset`` and, when given, its ``source``.
METADATA_KEY = "mammo_cascade.checkpoint"
_METADATA_FIELDS = ("format_version", "stage", "model_config", "preprocess_config", "class_names", "input_size",
                    "epoch", "best_metric", "metric_name", "roi", "versions", "lesion_threshold", "min_lesion_area",
                    "metadata")


def _as_checkpoint(checkpoint: dict | str | os.PathLike) -> dict:
    return checkpoint if isinstance(checkpoint, dict) else checkpoints.load_checkpoint(checkpoint)


def _metadata_json(checkpoint: dict, opset: int, source: dict | None) -> str:
    meta = {k: checkpoint[k] for k in _METADATA_FIELDS if k in checkpoint}
    meta["opset"] = int(opset)
    if source is not None:
        meta["source"] = dict(source)
    return json.dumps(meta, default=float)


def export_onnx_bytes(checkpoint: dict | str | os.PathLike, *, opset: int = ONNX_OPSET, dynamic_size: bool = False,
                      source: dict | None = None) -> bytes:
    """Export a stage checkpoint to an in-memory ONNX model (see :func:`export_onnx`).

    Args:
        checkpoint: a checkpoint dict or the path of a ``.pth`` checkpoint.
        opset: ONNX opset version.
        dynamic_size: leave H and W free as well as the batch axis.
        source: what the export was made from, stored as the metadata's ``source`` (plain JSON types; the export
            cache of ``runners.py`` stores ``{"checkpoint_sha256", "checkpoint_name"}``).

    Returns:
        The serialised ONNX model (bytes) with the checkpoint's settings in its metadata (:data:`METADATA_KEY`).

    Raises:
        FileNotFoundError / ValueError: from :func:`checkpoints.load_checkpoint` for a bad path.
    """
    import onnx
    import torch # only exporting needs it (see the module docstring)

    checkpoint = _as_checkpoint(checkpoint)
    model = checkpoints.model_from_checkpoint(checkpoint, "cpu")
    height, width = (int(v) for v in checkpoint["input_size"])
    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_size else {0: "batch"}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the classic exporter's deprecation and tracer warnings (all expected)
        torch.onnx.export(model, (torch.zeros(1, 1, height, width),), buffer, input_names=[INPUT_NAME],
                          output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
                          opset_version=opset, do_constant_folding=True, dynamo=False)
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, _metadata_json(checkpoint, opset, source)
    proto.producer_name = "mammo_cascade onnx_backend.py"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(checkpoint: dict | str | os.PathLike, out_path: str | os.PathLike, *, opset: int = ONNX_OPSET,
                dynamic_size: bool = False, overwrite: bool = False) -> Path:
    """Export a stage checkpoint to an ``.onnx`` file with a dynamic batch axis, written atomically.

    Args:
        checkpoint: checkpoint dict or ``.pth`` path (``checkpoints.save_checkpoint`` format).
        out_path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset (default :data:`ONNX_OPSET`).
        dynamic_size: also leave H and W free (default: fixed at the checkpoint's ``input_size``).
        overwrite: replace an existing file (default: refuse).

    Returns:
        The path written.

    Raises:
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
        FileNotFoundError / ValueError: bad checkpoint (see :func:`checkpoints.load_checkpoint`).
    """
    out_path = Path(out_path)
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"{out_path} exists; pass overwrite=True (--overwrite) or choose another output folder")
    data = export_onnx_bytes(checkpoint, opset=opset, dynamic_size=dynamic_size)
    fileio.atomic_write_bytes(out_path, data, overwrite=overwrite)
    return out_path


def read_onnx_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint settings stored in an exported ``.onnx`` file (a checkpoint dict without weights).

    The result works as a ``cascade.Cascade`` checkpoint argument when the matching runner is passed as well.

    Raises:
        FileNotFoundError: no such file. ValueError: not an ONNX model exported by :func:`export_onnx`.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} not found; export one with onnx_backend.py --output-dir DIR")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:
        raise ValueError(f"{path} is not a readable ONNX model ({type(error).__name__}: {error})") from error
    return settings_from_metadata({entry.key: entry.value for entry in proto.metadata_props}, path)


def settings_from_metadata(metadata: dict, source: str | os.PathLike) -> dict:
    """The checkpoint settings in an ONNX model's metadata map (``{key: value}`` strings, as
    ``onnxruntime.InferenceSession.get_modelmeta().custom_metadata_map`` gives them, so no second parse of the file
    is needed); ``source`` names the file in errors.

    Raises:
        ValueError: no :data:`METADATA_KEY` entry, or one that is not JSON.
    """
    if METADATA_KEY not in metadata:
        raise ValueError(f"{source} holds no '{METADATA_KEY}' metadata: it was not exported by "
                         "onnx_export.export_onnx (re-export it from the .pth checkpoint with onnx_backend.py)")
    try:
        return json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise ValueError(f"{source}: its '{METADATA_KEY}' metadata is not JSON ({error}); re-export it from the .pth "
                         "checkpoint with onnx_backend.py") from error
