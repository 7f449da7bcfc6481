"""Checkpoint (or exported ONNX file) -> a runner for any backend: the one place every user of a network goes through.

A *runner* is a logits function ``(N, 1, H, W)`` float32 in [0, 1] -> ``(N, C, H, W)`` float32 logits at the same
size. :func:`load_runner` makes one from a ``.pth`` checkpoint (PyTorch, or ONNX Runtime through an in-memory export)
or an ``.onnx`` file (ONNX Runtime); :func:`make_runner` does the same from a checkpoint dict. The cascade
(``cascade.py``), stage-2 training crops (``roi_crops.py``), inference, evaluation and the benchmark all use these.

ONNX Runtime sessions run on the CPU with intra-op threads only (:func:`session_options`); export is ``onnx_export.py``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import checkpoints

BACKENDS = ("torch", "onnxruntime")

#: ONNX Runtime graph optimisation levels by name. "all" (the default) adds layout optimisations (NCHWc blocked
#: convolutions on x86) to the basic fusions (Conv + BatchNorm folding, Conv + ReLU); all of them stay in fp32.
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

LogitsFn = Callable[[np.ndarray], np.ndarray]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cuda"`` without a GPU raises ``RuntimeError`` saying so."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def available_cores() -> int:
    """CPU cores this process may run on (``os.sched_getaffinity`` where it exists, else ``os.cpu_count()``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


class TorchRunner:
    """Runs a PyTorch model on a NumPy batch: ``(N, 1, H, W)`` float32 in [0, 1] -> logits ``(N, C, H, W)`` float32.

    Args:
        model: a model in eval mode.
        device: where it runs.
        amp: autocast (float16 on CUDA, bfloat16 on the CPU); outputs are float32 either way.
        channels_last: use the channels-last memory format (often faster for convolutions on CPU and GPU).
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", amp: bool = False, channels_last: bool = False):
        self.device = torch.device(device)
        self.amp = amp
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(self.device.type, enabled=self.amp):
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device, memory_format=self.memory_format)
            return self.model(x).float().cpu().numpy()


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

    Drop-in replacement for ``TorchRunner`` (``Cascade(stage1_runner=OnnxRunner(...))``).

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
        self.input_name, self.output_name = self.session.get_inputs()[0].name, self.session.get_outputs()[0].name
        shape = self.session.get_inputs()[0].shape  # e.g. ["batch", 1, 512, 512]
        self.input_hw = (int(shape[2]), int(shape[3])) if all(isinstance(s, int) for s in shape[2:]) else None

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Run the network on ``batch`` ``(N, 1, H, W)`` float32; raises ValueError on a wrong shape."""
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 4 or (self.input_hw is not None and tuple(batch.shape[2:]) != self.input_hw):
            expected = "(N, 1, {}, {})".format(*self.input_hw) if self.input_hw else "(N, 1, H, W)"
            raise ValueError(f"OnnxRunner: expected a batch of shape {expected}, got {batch.shape}; letterbox the "
                             "images to the model's input size (imaging.letterbox)")
        return self.session.run([self.output_name], {self.input_name: batch})[0]


def make_runner(checkpoint: dict, backend: str = "torch", device: str | torch.device = "cpu", *, amp: bool = False,
                channels_last: bool = False, threads: int | None = None) -> LogitsFn:
    """A logits function for a stage checkpoint dict under ``backend``.

    Args:
        checkpoint: checkpoint dict (with weights).
        backend: "torch" (``TorchRunner``; ``amp`` and ``channels_last`` apply) or "onnxruntime"
            (exported in memory, run on the CPU with ``threads`` intra-op threads).
        device: torch device for the "torch" backend.

    Raises:
        ValueError: unknown backend, or "onnxruntime" with a non-CPU device.
    """
    if backend == "torch":
        return TorchRunner(checkpoints.model_from_checkpoint(checkpoint, device), device, amp, channels_last)
    if backend == "onnxruntime":
        if torch.device(device).type != "cpu":
            raise ValueError(f"--backend onnxruntime runs on the CPU here; use --device cpu (got {device!r}) or --backend torch")
        import onnx_export  # only the ONNX Runtime route needs the exporter (and onnx_export uses this module)

        return OnnxRunner(onnx_export.export_onnx_bytes(checkpoint), threads=threads)
    raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")


def load_runner(path: str | os.PathLike, backend: str = "torch", device: str | torch.device = "cpu", *,
                amp: bool = False, channels_last: bool = False, threads: int | None = None) -> tuple[LogitsFn, dict]:
    """Load a stage from a ``.pth`` checkpoint or an exported ``.onnx`` file: ``(logits function, checkpoint dict)``.

    An ``.onnx`` file always runs under ONNX Runtime (its returned dict has no weights); a ``.pth`` file runs
    under ``backend`` (see :func:`make_runner`).

    Raises:
        ValueError: an ``.onnx`` file with ``backend="torch"``, or a bad file (see ``onnx_export.read_onnx_metadata``,
            :func:`checkpoints.load_checkpoint`).
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if backend != "onnxruntime":
            raise ValueError(f"{path} is an ONNX model: use --backend onnxruntime, or pass the .pth checkpoint for torch")
        import onnx_export  # see make_runner

        return OnnxRunner(path, threads=threads), onnx_export.read_onnx_metadata(path)
    checkpoint = checkpoints.load_checkpoint(path)
    return make_runner(checkpoint, backend, device, amp=amp, channels_last=channels_last, threads=threads), checkpoint
