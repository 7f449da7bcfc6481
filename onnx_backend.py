"""ONNX export of the cascade's stage checkpoints and an ONNX Runtime runner for CPU inference.

A stage checkpoint (``cascade.save_checkpoint``) becomes one self-contained ``.onnx`` file: the network with a
dynamic batch axis (input ``image`` ``(N, 1, H, W)`` float32 in [0, 1], output ``logits`` ``(N, C, H, W)``
float32) and, in the model's metadata, everything else the cascade needs to use it (stage, input size,
preprocessing config, class names, ROI settings, model config; not the optimizer). So
``cascade.Cascade(read_onnx_metadata(p1), read_onnx_metadata(p2), stage1_runner=OnnxRunner(p1),
stage2_runner=OnnxRunner(p2))`` runs the cascade without PyTorch weights; :func:`load_runner` does this for a
``.pth`` or an ``.onnx`` path alike.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)``. Torch 2.14's default (dynamo) exporter
needs the ``onnxscript`` package, which this suite does not install; the classic exporter needs only ``onnx``,
runs offline and exports these convolutional networks exactly (max |logit difference| to PyTorch ~1e-6, see
``tests/test_onnx_backend.py``). Opset 17 (:data:`ONNX_OPSET`): supported by every onnxruntime >= 1.13.

The spatial size is fixed at the checkpoint's ``input_size`` (the cascade always letterboxes to it); pass
``dynamic_size=True`` to :func:`export_onnx` to also leave H and W free (multiples of 32).

Command line (exports both stages and checks parity)::

    python onnx_backend.py --stage1-weights checkpoints/stage1/best_stage1.pth \\
        --stage2-weights checkpoints/stage2/best_stage2.pth --output-dir onnx/
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import cascade
import fileio

#: ONNX opset of the exported graphs (onnxruntime >= 1.13 runs it; everything these networks use exists in it).
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "image", "logits"

#: Key of the ONNX metadata entry holding the checkpoint's settings as JSON (all keys but the weights and the
#: optimizer / scheduler / scaler / RNG states).
METADATA_KEY = "mammo_cascade.checkpoint"
_METADATA_FIELDS = ("format_version", "stage", "model_config", "preprocess_config", "class_names", "input_size",
                    "epoch", "best_metric", "metric_name", "roi", "versions")

BACKENDS = ("torch", "onnxruntime")

#: ONNX Runtime graph optimisation levels by name. "all" (the default) adds layout optimisations (NCHWc blocked
#: convolutions on x86) to the basic fusions (Conv + BatchNorm folding, Conv + ReLU); all of them stay in fp32.
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

LogitsFn = Callable[[np.ndarray], np.ndarray]


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity`` where it exists, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def _as_checkpoint(checkpoint: dict | str | os.PathLike) -> dict:
    return checkpoint if isinstance(checkpoint, dict) else cascade.load_checkpoint(checkpoint)


def _metadata_json(checkpoint: dict) -> str:
    meta = {k: checkpoint[k] for k in _METADATA_FIELDS if k in checkpoint}
    return json.dumps(meta, default=float)


def export_onnx_bytes(checkpoint: dict | str | os.PathLike, *, opset: int = ONNX_OPSET, dynamic_size: bool = False) -> bytes:
    """Export a stage checkpoint to an in-memory ONNX model (see :func:`export_onnx`).

    Args:
        checkpoint: a checkpoint dict or the path of a ``.pth`` checkpoint.
        opset: ONNX opset version.
        dynamic_size: leave H and W free as well as the batch axis.

    Returns:
        The serialised ONNX model (bytes) with the checkpoint's settings in its metadata (:data:`METADATA_KEY`).

    Raises:
        FileNotFoundError / ValueError: from :func:`cascade.load_checkpoint` for a bad path.
    """
    import onnx

    checkpoint = _as_checkpoint(checkpoint)
    model = cascade.model_from_checkpoint(checkpoint, "cpu")
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
    entry.key, entry.value = METADATA_KEY, _metadata_json(checkpoint)
    proto.producer_name = "mammo_cascade onnx_backend.py"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def export_onnx(checkpoint: dict | str | os.PathLike, out_path: str | os.PathLike, *, opset: int = ONNX_OPSET,
                dynamic_size: bool = False, overwrite: bool = False) -> Path:
    """Export a stage checkpoint to an ``.onnx`` file with a dynamic batch axis, written atomically.

    Args:
        checkpoint: checkpoint dict or ``.pth`` path (``cascade.save_checkpoint`` format).
        out_path: the ``.onnx`` file to write (parent folders are created).
        opset: ONNX opset (default :data:`ONNX_OPSET`).
        dynamic_size: also leave H and W free (default: fixed at the checkpoint's ``input_size``).
        overwrite: replace an existing file (default: refuse).

    Returns:
        The path written.

    Raises:
        FileExistsError: ``out_path`` exists and ``overwrite`` is False.
        FileNotFoundError / ValueError: bad checkpoint (see :func:`cascade.load_checkpoint`).
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
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ValueError(f"{path} holds no '{METADATA_KEY}' metadata: it was not exported by onnx_backend.export_onnx "
                     "(re-export it from the .pth checkpoint with onnx_backend.py)")


def session_options(threads: int | None = None, optimization: str = "all"):
    """ONNX Runtime session options for CPU inference.

    Args:
        threads: intra-op threads (default: :func:`available_cores`); inter-op parallelism is off (one thread,
            sequential execution: a U-Net is one chain of large ops, so threads are best spent inside each op).
        optimization: graph optimisation level, one of :data:`GRAPH_OPTIMIZATION_LEVELS` (default "all").

    Raises:
        ValueError: unknown optimisation level.
    """
    import onnxruntime as ort

    levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if optimization not in levels:
        raise ValueError(f"optimization must be one of {GRAPH_OPTIMIZATION_LEVELS}, not {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization]
    options.intra_op_num_threads = int(threads or available_cores())
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    return options


class OnnxRunner:
    """A logits function over an ONNX Runtime session: ``(N, 1, H, W)`` float32 in [0, 1] -> ``(N, C, H, W)`` float32.

    Drop-in replacement for ``cascade.TorchRunner`` (``Cascade(stage1_runner=OnnxRunner(...))``).

    Args:
        model: path of an ``.onnx`` file or the serialised model (bytes, e.g. from :func:`export_onnx_bytes`).
        threads: intra-op threads (default: all cores this process may use).
        optimization: graph optimisation level (see :func:`session_options`).
        providers: ONNX Runtime execution providers (default ``["CPUExecutionProvider"]``).

    Attributes:
        input_hw: the fixed network input size ``(H, W)``, or None when the model has free spatial axes.

    Raises:
        FileNotFoundError: no file at ``model``.
    """

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None, optimization: str = "all",
                 providers: list[str] | None = None):
        import onnxruntime as ort

        if not isinstance(model, (bytes, bytearray)):
            if not Path(model).is_file():
                raise FileNotFoundError(f"ONNX model {model} not found; export one with onnx_backend.py --output-dir DIR")
            model = str(model)
        self.threads = int(threads or available_cores())
        self.session = ort.InferenceSession(model, session_options(self.threads, optimization),
                                            providers=providers or ["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape  # e.g. ["batch", 1, 512, 512]
        self.input_hw = (int(shape[2]), int(shape[3])) if all(isinstance(s, int) for s in shape[2:]) else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on ``batch`` ``(N, 1, H, W)`` float32; raises ValueError on a wrong shape."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or (self.input_hw is not None and tuple(batch.shape[2:]) != self.input_hw):
            expected = "(N, 1, {}, {})".format(*self.input_hw) if self.input_hw else "(N, 1, H, W)"
            raise ValueError(f"OnnxRunner: expected a batch of shape {expected}, got {batch.shape}; letterbox the "
                             "images to the model's input size (imaging.letterbox)")
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def make_runner(checkpoint: dict, backend: str = "torch", device: str | torch.device = "cpu", *, amp: bool = False,
                channels_last: bool = False, threads: int | None = None) -> LogitsFn:
    """A logits function for a stage checkpoint dict under ``backend``.

    Args:
        checkpoint: checkpoint dict (with weights).
        backend: "torch" (``cascade.TorchRunner``; ``amp`` and ``channels_last`` apply) or "onnxruntime"
            (exported in memory, run on the CPU with ``threads`` intra-op threads).
        device: torch device for the "torch" backend.

    Raises:
        ValueError: unknown backend, or "onnxruntime" with a non-CPU device.
    """
    if backend == "torch":
        return cascade.TorchRunner(cascade.model_from_checkpoint(checkpoint, device), device, amp, channels_last)
    if backend == "onnxruntime":
        if torch.device(device).type != "cpu":
            raise ValueError(f"--backend onnxruntime runs on the CPU here; use --device cpu (got {device!r}) or --backend torch")
        return OnnxRunner(export_onnx_bytes(checkpoint), threads=threads)
    raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")


def load_runner(path: str | os.PathLike, backend: str = "torch", device: str | torch.device = "cpu", *,
                amp: bool = False, channels_last: bool = False, threads: int | None = None) -> tuple[LogitsFn, dict]:
    """Load a stage from a ``.pth`` checkpoint or an exported ``.onnx`` file: ``(logits function, checkpoint dict)``.

    An ``.onnx`` file always runs under ONNX Runtime (its returned dict has no weights); a ``.pth`` file runs
    under ``backend`` (see :func:`make_runner`).

    Raises:
        ValueError: an ``.onnx`` file with ``backend="torch"``, or a bad file (see :func:`read_onnx_metadata`,
            :func:`cascade.load_checkpoint`).
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if backend != "onnxruntime":
            raise ValueError(f"{path} is an ONNX model: use --backend onnxruntime, or pass the .pth checkpoint for torch")
        return OnnxRunner(path, threads=threads), read_onnx_metadata(path)
    checkpoint = cascade.load_checkpoint(path)
    return make_runner(checkpoint, backend, device, amp=amp, channels_last=channels_last, threads=threads), checkpoint


def max_logit_difference(checkpoint: dict, onnx_model: str | os.PathLike | bytes, batch: np.ndarray,
                         optimization: str = "all") -> float:
    """Largest absolute difference between PyTorch (fp32, eager) and ONNX Runtime logits on ``batch``.

    Args:
        checkpoint: the stage checkpoint dict the ONNX model was exported from.
        onnx_model: the exported model (path or bytes).
        batch: ``(N, 1, H, W)`` float32 in [0, 1] at the model's input size.
    """
    reference = cascade.TorchRunner(cascade.model_from_checkpoint(checkpoint, "cpu"))(batch)
    return float(np.abs(OnnxRunner(onnx_model, optimization=optimization)(batch) - reference).max())


def export_stages(stage1_weights: str | os.PathLike | None, stage2_weights: str | os.PathLike | None,
                  output_dir: str | os.PathLike, *, overwrite: bool = False, dynamic_size: bool = False,
                  opset: int = ONNX_OPSET, check: bool = True, seed: int = 0) -> dict:
    """Export the given stages to ``output_dir/stage1.onnx`` and ``stage2.onnx``; optionally check parity.

    Parity is checked on a seeded random batch of two images at the stage's input size.

    Returns:
        ``{"stage1": {"path": str, "max_abs_logit_diff": float | None}, "stage2": {...}}`` for the stages given.

    Raises:
        ValueError: neither stage given. FileExistsError: an output exists and ``overwrite`` is False.
    """
    if stage1_weights is None and stage2_weights is None:
        raise ValueError("nothing to export: pass --stage1-weights and/or --stage2-weights")
    report = {}
    for name, weights in (("stage1", stage1_weights), ("stage2", stage2_weights)):
        if weights is None:
            continue
        checkpoint = cascade.load_checkpoint(weights)
        path = export_onnx(checkpoint, Path(output_dir) / f"{name}.onnx", opset=opset, dynamic_size=dynamic_size,
                           overwrite=overwrite)
        diff = None
        if check:
            height, width = (int(v) for v in checkpoint["input_size"])
            batch = np.random.default_rng(seed).random((2, 1, height, width), dtype=np.float32)
            diff = max_logit_difference(checkpoint, path, batch)
        report[name] = {"path": str(path), "max_abs_logit_diff": diff}
    return report


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the ONNX export."""
    parser = argparse.ArgumentParser(description="Export the cascade's stage checkpoints to ONNX (dynamic batch).",
                                     add_help=add_help)
    parser.add_argument("--stage1-weights", type=str, default=None, help="stage-1 checkpoint (.pth) (default: %(default)s)")
    parser.add_argument("--stage2-weights", type=str, default=None, help="stage-2 checkpoint (.pth) (default: %(default)s)")
    parser.add_argument("--output-dir", type=str, required=True, help="folder for stage1.onnx / stage2.onnx")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset version (default: %(default)s)")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="leave height and width free too (default: fixed at the checkpoint's input size)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .onnx files")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the PyTorch vs ONNX Runtime logits comparison")
    return parser


def main(args: argparse.Namespace) -> int:
    """Export the given stage checkpoints to ONNX and check parity; returns 0, or 2 for bad input."""
    try:
        report = export_stages(args.stage1_weights, args.stage2_weights, args.output_dir, overwrite=args.overwrite,
                               dynamic_size=args.dynamic_size, opset=args.opset, check=args.check)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, item in report.items():
        diff = item["max_abs_logit_diff"]
        print(f"{name}: {item['path']}" + ("" if diff is None else f"  (max |logit diff| vs PyTorch: {diff:.2e})"))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
