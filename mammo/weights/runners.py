"""Checkpoint (or exported ONNX file) -> a runner for any backend: the one place every user of a network goes through.

A *runner* is a logits function ``(N, 1, H, W)`` float32 in [0, 1] -> ``(N, C, H, W)`` float32 logits at the same
size; its ``backend`` ("torch" / "onnxruntime"), ``device`` and ``amp`` attributes say how it runs.
:func:`load_runner` makes one from a ``.pth`` checkpoint or an ``.onnx`` file; :func:`make_runner` does the same from
a checkpoint dict. The cascade (:mod:`mammo.cascade.pipeline`), stage-2 training crops (:mod:`mammo.training.roi_crops`), inference, evaluation and
the benchmark all use these.

Backends (:data:`BACKENDS`, the ``--backend`` flag): "torch", "onnxruntime" (on the CPU, intra-op threads only, see
:func:`session_options`), or "auto", the fastest correct one for the device (:func:`resolve_backend`): ONNX Runtime
on the CPU when it is installed, else PyTorch; on CUDA, PyTorch with float16 autocast (``amp``; outputs float32).

ONNX export cache: a ``.pth`` run under ONNX Runtime by :func:`load_runner` is exported once and the export kept,
keyed by the checkpoint file's SHA-256: ``<checkpoint stem>.<first 16 hex digits of its SHA-256>.onnx`` beside the
checkpoint, or, when that folder cannot be written, in :func:`onnx_cache_dir` (``$XDG_CACHE_HOME/mammo_cascade/onnx``,
default ``~/.cache/mammo_cascade/onnx``). Later runs load it directly. A cache file is used only when ONNX Runtime
opens it and its metadata names the same checkpoint SHA-256 and export opset; otherwise it is made again. Files are
written atomically (``fileio``), so processes exporting at the same time (torchrun ranks) each leave a whole file.
A new export beside the checkpoint removes the exports of earlier versions of that checkpoint file.
A ``.safetensors`` model file (``release.py``; the shipped default model in ``weights/``, often read-only) is
exported and cached the same way; the settings an export does not carry (``lesion_threshold``, ``min_lesion_area``,
the provenance ``metadata``) are read from the file's header (no PyTorch) and added to the returned settings.

Imports: PyTorch is imported only where it is needed (a ``TorchRunner``, reading a ``.pth`` file, exporting), not by
this module, ``checkpoints``, ``onnx_export`` or ``cascade``: running an ``.onnx`` file, or a ``.pth`` whose cached
export exists, loads no PyTorch (measured with both default ResNet34 stages: 0.52 instead of 1.0 GB peak memory
after loading, 0.7 instead of 1.8 s). Reading a ``.pth`` itself (first export, or the torch backend) needs PyTorch.
With ``device="auto"`` on Linux, a machine without an NVIDIA / AMD GPU device node is known to have no CUDA without
importing PyTorch (:func:`cuda_available`).
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from mammo.weights import checkpoints
from mammo.core import fileio
from mammo.weights import onnx_export, release

if TYPE_CHECKING:  # annotations only; torch is imported where it is used (see the module docstring)
    import torch

#: ``--backend`` choices: "auto" picks one of the others (:func:`resolve_backend`).
BACKENDS = ("auto", "torch", "onnxruntime")

#: ONNX Runtime graph optimisation levels by name. "all" (the default) adds layout optimisations (NCHWc blocked
#: convolutions on x86) to the basic fusions (Conv + BatchNorm folding, Conv + ReLU); all of them stay in fp32.
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

#: Device nodes of a GPU driver on Linux (NVIDIA, NVIDIA under WSL 2, AMD ROCm): without any of them CUDA is absent.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/dxg", "/dev/kfd")

LogitsFn = Callable[[np.ndarray], np.ndarray]


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing PyTorch where the answer is certainly no (Linux with none of
    :data:`GPU_DEVICE_NODES`); elsewhere PyTorch is imported to ask it."""
    if "torch" not in sys.modules and sys.platform.startswith("linux") and not any(
            os.path.exists(node) for node in GPU_DEVICE_NODES):
        return False
    import torch

    return bool(torch.cuda.is_available())


def device_type(device: str | torch.device) -> str:
    """``"cpu"`` or ``"cuda"`` for a device name or ``torch.device``; ``"auto"`` asks :func:`cuda_available`."""
    name = str(device)
    if name == "auto":
        return "cuda" if cuda_available() else "cpu"
    return name.split(":", 1)[0]


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA if available else CPU; ``"cuda"`` without a GPU raises ``RuntimeError`` saying so."""
    import torch

    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(name).startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


@functools.lru_cache(maxsize=None)
def onnxruntime_available() -> bool:
    """Whether ``onnxruntime`` imports here (checked once per process)."""
    try:
        importlib.import_module("onnxruntime")
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: str | torch.device = "auto") -> str:
    """The backend that runs: ``"torch"`` or ``"onnxruntime"``.

    ``"auto"``: ONNX Runtime when ``device`` is the CPU (``"auto"`` without CUDA counts as the CPU) and onnxruntime
    imports; PyTorch otherwise (on CUDA it runs with float16 autocast: see :func:`make_runner`). Another name is
    returned as given.

    Raises:
        ValueError: a name not in :data:`BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    if backend != "auto":
        return backend
    return "onnxruntime" if device_type(device) == "cpu" and onnxruntime_available() else "torch"


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

    backend = "torch"

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu", amp: bool = False, channels_last: bool = False):
        import torch

        self._torch = torch
        self.device = torch.device(device)
        self.amp = amp
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=self.memory_format).eval()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        torch = self._torch
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
    # No spin-waiting of the intra-op threads after a run: on a 2-core CPU they otherwise burn the cycles that the
    # reader / writer threads of a folder run need. Measured (issue 13, 12 vs 2 copies of a 2944x1920 image, two
    # interleaved rounds): 577 / 553 ms per image with spinning, 500 / 474 ms without.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        path: the ``.onnx`` file (None for an in-memory model).
        metadata: the model's custom metadata ``{key: value}`` (the checkpoint settings: see
            ``onnx_export.settings_from_metadata``).

    Raises:
        FileNotFoundError: no file at ``model``.
        ValueError: ONNX Runtime cannot load the file (not an ONNX model, truncated, corrupt).
    """

    backend, device, amp = "onnxruntime", "cpu", False

    def __init__(self, model: str | os.PathLike | bytes, threads: int | None = None, optimization: str = "all",
                 providers: list[str] | None = None):
        import onnxruntime as ort

        name = "the in-memory ONNX model"
        if not isinstance(model, (bytes, bytearray)):
            if not Path(model).is_file():
                raise FileNotFoundError(f"ONNX model {model} not found; export one with onnx_backend.py --output-dir DIR")
            model = name = str(model)
        self.threads = int(threads or available_cores())
        try:
            self.session = ort.InferenceSession(model, session_options(self.threads, optimization),
                                                providers=providers or ["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) share no base
            raise ValueError(f"ONNX Runtime cannot load {name}: {type(error).__name__}: {error}; re-export it from "
                             "the .pth checkpoint (onnx_backend.py)") from error
        self.path = None if isinstance(model, (bytes, bytearray)) else Path(model)
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
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
        backend: "torch" (``TorchRunner``; ``amp`` and ``channels_last`` apply), "onnxruntime" (exported in memory,
            run on the CPU with ``threads`` intra-op threads) or "auto" (:func:`resolve_backend`; on CUDA it turns
            ``amp`` on).
        device: "auto", "cpu", "cuda[:N]" or a ``torch.device``; ONNX Runtime takes "auto" as the CPU.

    Raises:
        ValueError: unknown backend, or "onnxruntime" with a CUDA device.
        RuntimeError: a CUDA device without a GPU (:func:`resolve_device`).
    """
    chosen = resolve_backend(backend, device)
    if chosen == "torch":
        torch_device = resolve_device(device)
        amp = amp or (backend == "auto" and torch_device.type == "cuda")
        model = checkpoints.model_from_checkpoint(checkpoint, torch_device)
        return TorchRunner(model, torch_device, amp, channels_last)
    _check_cpu(device)

    return OnnxRunner(onnx_export.export_onnx_bytes(checkpoint), threads=threads)


def _check_cpu(device) -> None:
    if str(device) != "auto" and device_type(device) != "cpu":
        raise ValueError(f"--backend onnxruntime runs on the CPU here; use --device cpu (got {str(device)!r}) or "
                         "--backend torch")


def load_runner(path: str | os.PathLike, backend: str = "torch", device: str | torch.device = "cpu", *,
                amp: bool = False, channels_last: bool = False, threads: int | None = None,
                onnx_cache: bool = True) -> tuple[LogitsFn, dict]:
    """Load a stage from a ``.pth`` checkpoint, a ``.safetensors`` model file (``release.py``) or an exported
    ``.onnx`` file: ``(logits function, checkpoint dict)``.

    An ``.onnx`` file always runs under ONNX Runtime ("auto" or "onnxruntime"). A ``.pth`` or ``.safetensors`` file
    runs under
    ``backend`` (see :func:`make_runner`); under ONNX Runtime through its cached export (:func:`cached_onnx`, see the
    module docstring; ``onnx_cache=False`` exports in memory instead), and ``runner.path`` is the export used. Under
    ONNX Runtime the returned dict holds the checkpoint's settings without the weights (from the ONNX metadata);
    under torch, the whole checkpoint.

    Raises:
        ValueError: an ``.onnx`` file with ``backend="torch"``, or a bad file (see
            ``onnx_export.settings_from_metadata``, :func:`checkpoints.load_checkpoint`).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        if backend == "torch":
            raise ValueError(f"{path} is an ONNX model: use --backend onnxruntime, or pass the .pth checkpoint for torch")
        resolve_backend(backend, "cpu")  # the name is checked
        return _onnx_runner(path, threads)
    if resolve_backend(backend, device) == "onnxruntime" and onnx_cache:
        _check_cpu(device)
        return cached_onnx(path, threads)
    checkpoint = checkpoints.load_checkpoint(path)
    return make_runner(checkpoint, backend, device, amp=amp, channels_last=channels_last, threads=threads), checkpoint


def _onnx_runner(path: Path, threads: int | None) -> tuple[OnnxRunner, dict]:

    runner = OnnxRunner(path, threads=threads)
    return runner, onnx_export.settings_from_metadata(runner.metadata, path)


# -------------------------------------------------------------------------------------------- the export cache
#: Sub-folder of the user's cache folder that holds exports of checkpoints whose own folder cannot be written.
ONNX_CACHE_SUBDIR = os.path.join("mammo_cascade", "onnx")

_CACHE_NAME = re.compile(r"^(?P<stem>.+)\.(?P<key>[0-9a-f]{16})\.onnx$")


def onnx_cache_dir() -> Path:
    """Where exports go when the checkpoint's folder is read-only: ``$XDG_CACHE_HOME/mammo_cascade/onnx``, default
    ``~/.cache/mammo_cascade/onnx`` (the XDG base-directory convention, which ignores a relative
    ``XDG_CACHE_HOME``)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / ONNX_CACHE_SUBDIR


def onnx_cache_name(checkpoint_path: str | os.PathLike, sha256: str) -> str:
    """``<checkpoint stem>.<sha256[:16]>.onnx``: the file name of a checkpoint's cached export."""
    return f"{Path(checkpoint_path).stem}.{sha256[:16]}.onnx"


def _open_cached(candidate: Path, sha256: str, threads: int | None) -> tuple[OnnxRunner | None, dict, str]:
    """``(runner, settings, "")`` when ``candidate`` is the export of the checkpoint with ``sha256`` at the current
    opset, else ``(None, {}, why not)``."""

    try:
        runner, settings = _onnx_runner(candidate, threads)
    except ValueError as error:
        return None, {}, str(error)
    source = settings.get("source") or {}
    if source.get("checkpoint_sha256") != sha256:
        return None, {}, f"it was made from another checkpoint (SHA-256 {source.get('checkpoint_sha256')})"
    if settings.get("opset") != onnx_export.ONNX_OPSET:
        return None, {}, f"it was exported at opset {settings.get('opset')}, not {onnx_export.ONNX_OPSET}"
    return runner, settings, ""


def cached_onnx(checkpoint_path: str | os.PathLike, threads: int | None = None) -> tuple[OnnxRunner, dict]:
    """An ONNX Runtime runner over the export of a ``.pth`` checkpoint or ``.safetensors`` model file, made on first
    use and reused after (see the module docstring): ``(runner, checkpoint settings without weights)``;
    ``runner.path`` is the export. For a model file the settings are completed from its header
    (:func:`_with_file_settings`).

    Looks for :func:`onnx_cache_name` beside the checkpoint, then in :func:`onnx_cache_dir`, and uses the first that
    ONNX Runtime opens and whose metadata names this checkpoint's SHA-256 and the current opset. Otherwise the
    checkpoint is read (this needs PyTorch), exported and written atomically beside it, or in the cache folder when
    its own folder cannot be written; a stale or corrupt file of that name is replaced (a line on stderr says so).
    When neither folder can be written, the export runs from memory (``runner.path`` None) and a line says so.

    Raises:
        FileNotFoundError / ValueError: a missing or bad checkpoint (:func:`checkpoints.load_checkpoint`).
    """
    checkpoint_path = Path(checkpoint_path)
    if not checkpoint_path.is_file():
        checkpoints.load_checkpoint(checkpoint_path)  # raises the usual FileNotFoundError
    sha256 = fileio.file_sha256(checkpoint_path)
    name = onnx_cache_name(checkpoint_path, sha256)
    candidates = [checkpoint_path.parent / name, onnx_cache_dir() / name]
    for candidate in candidates:
        if candidate.is_file():
            runner, settings, problem = _open_cached(candidate, sha256, threads)
            if runner is not None:
                return runner, _with_file_settings(checkpoint_path, settings)
            print(f"runners: ignoring the cached ONNX export {candidate}: {problem}; exporting again", file=sys.stderr)

    data = onnx_export.export_onnx_bytes(checkpoints.load_checkpoint(checkpoint_path),
                                         source={"checkpoint_sha256": sha256, "checkpoint_name": checkpoint_path.name})
    failure = None
    for target in candidates:
        try:
            fileio.atomic_write_bytes(target, data)
            break
        except OSError as error:  # a read-only checkpoint folder: the user's cache folder instead
            failure = error
    else:
        print(f"runners: cannot keep the ONNX export of {checkpoint_path} beside it nor in {candidates[-1].parent} "
              f"({failure}); running it from memory, it will be exported again next time (set XDG_CACHE_HOME to a "
              "writable folder to keep it)", file=sys.stderr)
        runner = OnnxRunner(data, threads=threads)
        return runner, _with_file_settings(checkpoint_path,
                                           onnx_export.settings_from_metadata(runner.metadata, checkpoint_path))
    del data
    if target == candidates[0]:
        _remove_older_exports(checkpoint_path, sha256)
    print(f"runners: exported {checkpoint_path} to {target} (made once, reused while the checkpoint is unchanged)",
          file=sys.stderr)
    runner, settings = _onnx_runner(target, threads)
    return runner, _with_file_settings(checkpoint_path, settings)


def _with_file_settings(checkpoint_path: Path, settings: dict) -> dict:
    """``settings`` (from an export's ONNX metadata) completed, for a ``.safetensors`` model file, by the file's own
    settings (``release.read_settings``: its header only): ``lesion_threshold``, ``min_lesion_area``,
    ``val_metrics`` and ``metadata``, which an export does not carry. A ``.pth`` checkpoint's settings are returned
    unchanged."""
    if not release.is_weights_file(checkpoint_path):
        return settings
    return {**settings, **release.read_settings(checkpoint_path)}


def _remove_older_exports(checkpoint_path: Path, sha256: str) -> None:
    """Delete ``<stem>.<other key>.onnx`` beside the checkpoint: exports of earlier versions of the same file."""
    for other in checkpoint_path.parent.glob("*.onnx"):
        match = _CACHE_NAME.match(other.name)
        if match and match["stem"] == checkpoint_path.stem and match["key"] != sha256[:16]:
            try:
                other.unlink()
            except OSError:  # in use elsewhere (Windows) or already gone: it is only a stale cache file
                pass
