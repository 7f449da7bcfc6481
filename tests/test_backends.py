"""Backend choice and the ONNX export cache (runners.py): ``--backend auto``, one export per checkpoint version kept
beside it (or in the user's cache folder), stale and corrupt cache files replaced, no PyTorch on the ONNX route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mammo.weights import checkpoints
from mammo.cli import common
from mammo.core import fileio
from mammo import imaging
from mammo.weights import onnx_export
from mammo.weights import runners
from mammo.nn.models import build_model, default_model_config

ROOT = Path(__file__).resolve().parents[1]
SIZE = (64, 64)


def _save_stage(path: Path, stage: int = 1, seed: int = 0) -> Path:
    """A seeded untrained tiny stage checkpoint (ResNet18 encoder, 64x64) written to ``path``."""
    torch.manual_seed(seed)
    config = default_model_config(4 if stage == 1 else 1, encoder_name="resnet18")
    checkpoint = checkpoints.make_checkpoint(stage=stage, model=build_model(config), model_config=config,
                                             preprocess_config=imaging.DEFAULT_PREPROCESS, input_size=SIZE, epoch=seed)
    return checkpoints.save_checkpoint(checkpoint, path)


@pytest.fixture
def export_counter(monkeypatch) -> list:
    """Counts the calls of ``onnx_export.export_onnx_bytes`` (one per export actually made)."""
    calls = []
    real = onnx_export.export_onnx_bytes

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_onnx_bytes", counting)
    return calls


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    """A private user cache folder (``XDG_CACHE_HOME``) so that no test writes to the real ``~/.cache``."""
    home = tmp_path / "xdg_cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


# --------------------------------------------------------------------------------------------- backend choice
def test_resolve_backend_choices(monkeypatch):
    assert runners.resolve_backend("torch", "cpu") == "torch"
    assert runners.resolve_backend("onnxruntime", "cpu") == "onnxruntime"
    assert runners.resolve_backend("auto", "cpu") == "onnxruntime"  # onnxruntime is a requirement of the suite
    assert runners.resolve_backend("auto", torch.device("cpu")) == "onnxruntime"
    assert runners.resolve_backend("auto", "cuda") == "torch"
    assert runners.resolve_backend("auto", "cuda:1") == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        runners.resolve_backend("tensorrt", "cpu")
    # "auto" device: the CPU when there is no CUDA, else CUDA
    monkeypatch.setattr(runners, "cuda_available", lambda: False)
    assert runners.resolve_backend("auto", "auto") == "onnxruntime"
    monkeypatch.setattr(runners, "cuda_available", lambda: True)
    assert runners.resolve_backend("auto", "auto") == "torch"
    # without onnxruntime, auto falls back to torch on the CPU
    monkeypatch.setattr(runners, "onnxruntime_available", lambda: False)
    assert runners.resolve_backend("auto", "cpu") == "torch"


def test_cli_backend_defaults_to_auto():
    parser = common.runtime_parser("backend")
    assert parser.parse_args([]).backend == "auto"
    assert parser.parse_args(["--backend", "torch"]).backend == "torch"
    with pytest.raises(SystemExit):
        parser.parse_args(["--backend", "tensorrt"])


def test_auto_on_cuda_is_torch_with_float16_autocast(monkeypatch):
    """Wiring only (no GPU needed): auto on a CUDA device builds a TorchRunner with amp; an explicit torch does not."""
    made = []

    class FakeRunner:
        def __init__(self, model, device, amp, channels_last):
            made.append((str(device), amp))

    monkeypatch.setattr(runners, "TorchRunner", FakeRunner)
    monkeypatch.setattr(runners, "resolve_device", lambda name: torch.device(str(name)))
    monkeypatch.setattr(checkpoints, "model_from_checkpoint", lambda checkpoint, device: None)
    runners.make_runner({}, "auto", "cuda:0")
    runners.make_runner({}, "torch", "cuda:0")
    runners.make_runner({}, "torch", "cuda:0", amp=True)
    assert made == [("cuda:0", True), ("cuda:0", False), ("cuda:0", True)]
    with pytest.raises(ValueError, match="runs on the CPU"):
        runners.make_runner({}, "onnxruntime", "cuda")


# --------------------------------------------------------------------------------------------- the export cache
def test_export_is_cached_once_and_keyed_by_sha256(tmp_path, cache_home, export_counter, capsys):
    path = _save_stage(tmp_path / "ck" / "best_stage1.pth", seed=0)
    runner, settings = runners.load_runner(path, "onnxruntime", "cpu", threads=1)
    sha = fileio.file_sha256(path)
    cached = path.parent / f"best_stage1.{sha[:16]}.onnx"
    assert runner.path == cached and cached.is_file() and len(export_counter) == 1
    assert "exported" in capsys.readouterr().err
    assert settings["stage"] == 1 and settings["input_size"] == list(SIZE) and "model" not in settings
    assert settings["source"] == {"checkpoint_sha256": sha, "checkpoint_name": "best_stage1.pth"}
    # the export runs like the checkpoint under torch
    batch = np.random.default_rng(0).random((2, 1) + SIZE, dtype=np.float32)
    reference, _ = runners.load_runner(path, "torch", "cpu")
    assert np.abs(runner(batch) - reference(batch)).max() < 1e-4
    # a second load reuses the file: no export, the file untouched
    stamp = cached.stat().st_mtime_ns
    again, settings_again = runners.load_runner(path, "auto", "cpu", threads=1)
    assert again.path == cached and len(export_counter) == 1 and cached.stat().st_mtime_ns == stamp
    assert settings_again == settings
    np.testing.assert_array_equal(again(batch), runner(batch))
    # a changed checkpoint (same name) gets a new export; the old version's export beside it is removed
    _save_stage(path, seed=1)
    changed, _ = runners.load_runner(path, "onnxruntime", "cpu", threads=1)
    new_sha = fileio.file_sha256(path)
    assert new_sha != sha and changed.path == path.parent / f"best_stage1.{new_sha[:16]}.onnx"
    assert len(export_counter) == 2 and not cached.exists()
    assert np.abs(changed(batch) - runner(batch)).max() > 1e-3  # other weights, other logits
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(["best_stage1.pth", changed.path.name])
    assert not cache_home.exists()  # a writable checkpoint folder keeps its own exports


def test_corrupt_or_stale_cache_file_is_replaced(tmp_path, cache_home, export_counter, capsys):
    path = _save_stage(tmp_path / "best_stage2.pth", stage=2)
    cached = tmp_path / runners.onnx_cache_name(path, fileio.file_sha256(path))
    cached.write_bytes(b"\x08\x07truncated protobuf")  # e.g. a disk-full copy
    runner, settings = runners.load_runner(path, "onnxruntime", "cpu", threads=1)
    assert "ignoring the cached ONNX export" in capsys.readouterr().err
    assert runner.path == cached and len(export_counter) == 1 and settings["stage"] == 2
    assert runners.OnnxRunner(cached, threads=1).metadata  # a whole ONNX model now
    # a readable ONNX model of another checkpoint under this name is not trusted either
    other = _save_stage(tmp_path / "other" / "best_stage2.pth", stage=2, seed=5)
    onnx_export.export_onnx(other, cached, overwrite=True)
    runner, _ = runners.load_runner(path, "onnxruntime", "cpu", threads=1)
    assert "another checkpoint" in capsys.readouterr().err and len(export_counter) == 3
    meta = onnx_export.read_onnx_metadata(cached)
    assert meta["source"]["checkpoint_sha256"] == fileio.file_sha256(path)


def test_read_only_checkpoint_folder_uses_the_cache_folder(tmp_path, cache_home, export_counter, monkeypatch):
    folder = tmp_path / "readonly"
    path = _save_stage(folder / "best_stage1.pth")
    folder.chmod(0o555)
    real_write = fileio.atomic_write_bytes

    def refuse_in_folder(target, data, overwrite=True):  # root ignores the mode bits: refuse as the OS would
        if Path(target).parent == folder:
            raise PermissionError(13, "Permission denied", str(target))
        return real_write(target, data, overwrite)

    monkeypatch.setattr(fileio, "atomic_write_bytes", refuse_in_folder)
    try:
        runner, _ = runners.load_runner(path, "onnxruntime", "cpu", threads=1)
        expected = cache_home / "mammo_cascade" / "onnx" / runners.onnx_cache_name(path, fileio.file_sha256(path))
        assert runner.path == expected and expected.is_file()
        assert sorted(p.name for p in folder.iterdir()) == ["best_stage1.pth"]
        again, _ = runners.load_runner(path, "onnxruntime", "cpu", threads=1)
        assert again.path == expected and len(export_counter) == 1
        # neither folder writable: the export runs from memory, nothing is written
        def refuse(target, data, overwrite=True):
            raise PermissionError(13, "Permission denied", str(target))

        monkeypatch.setattr(fileio, "atomic_write_bytes", refuse)
        expected.unlink()
        in_memory, settings = runners.load_runner(path, "onnxruntime", "cpu", threads=1)
        assert in_memory.path is None and settings["stage"] == 1 and not expected.exists()
    finally:
        folder.chmod(0o755)


def test_cache_folder_follows_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runners.onnx_cache_dir() == tmp_path / "xdg" / "mammo_cascade" / "onnx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runners.onnx_cache_dir() == tmp_path / "home" / ".cache" / "mammo_cascade" / "onnx"
    name = runners.onnx_cache_name("/a/b/best_stage1.pth", "0123456789abcdef" * 4)
    assert name == "best_stage1.0123456789abcdef.onnx"


def test_concurrent_processes_leave_one_whole_export(tmp_path, cache_home):
    """Two processes (as torchrun ranks) exporting the same checkpoint at once both run, and leave one valid file."""
    path = _save_stage(tmp_path / "best_stage1.pth")
    code = ("import sys; from mammo.weights import runners; "
            "r, s = runners.load_runner(sys.argv[1], 'onnxruntime', 'cpu', threads=1); "
            "print(r.path)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=240) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), outputs
    cached = tmp_path / runners.onnx_cache_name(path, fileio.file_sha256(path))
    assert {out.strip() for out, _ in outputs} == {str(cached)}
    left = sorted(p.name for p in tmp_path.iterdir() if p != cache_home)
    assert left == sorted(["best_stage1.pth", cached.name])  # no temporary file left behind
    assert onnx_export.read_onnx_metadata(cached)["source"]["checkpoint_sha256"] == fileio.file_sha256(path)


# ------------------------------------------------------------------------------------------ no torch on the ONNX route
def test_onnx_route_does_not_import_torch(tmp_path, cache_home):
    stage1 = _save_stage(tmp_path / "best_stage1.pth", stage=1)
    stage2 = _save_stage(tmp_path / "best_stage2.pth", stage=2, seed=3)
    onnx1 = onnx_export.export_onnx(stage1, tmp_path / "stage1.onnx")
    runners.load_runner(stage2, "onnxruntime", "cpu", threads=1)  # makes stage 2's cached export
    script = f"""
import json
import sys
import numpy as np
from mammo.weights import runners
from mammo import cascade
runner1, settings1 = runners.load_runner({str(onnx1)!r}, "onnxruntime")
runner2, settings2 = runners.load_runner({str(stage2)!r}, "auto", "cpu", threads=1)  # the cached export
pixels = (np.arange(96 * 64, dtype=np.float64).reshape(96, 64) % 251).astype(np.uint8)
result = cascade.Cascade(settings1, settings2, stage1_runner=runner1, stage2_runner=runner2)(pixels)
print(json.dumps({{"torch": "torch" in sys.modules, "backends": [runner1.backend, runner2.backend],
                  "shape": list(result.lesion_prob.shape), "cached": str(runner2.path)}}))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["torch"] is False, "the ONNX route imported torch"
    assert report["backends"] == ["onnxruntime", "onnxruntime"] and report["shape"] == [96, 64]
    assert report["cached"].endswith(".onnx") and "exported" not in done.stderr  # reused, not re-made


def test_onnx_file_errors(tmp_path):
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="junk.onnx"):
        runners.load_runner(tmp_path / "junk.onnx", "auto")
    with pytest.raises(ValueError, match="backend onnxruntime"):
        runners.load_runner(tmp_path / "junk.onnx", "torch")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        runners.load_runner(tmp_path / "missing.pth", "onnxruntime", "cpu")


def test_relative_xdg_cache_home_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: only absolute paths count
    monkeypatch.setenv("HOME", str(tmp_path))
    assert runners.onnx_cache_dir() == tmp_path / ".cache" / "mammo_cascade" / "onnx"
