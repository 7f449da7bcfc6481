"""ONNX export and the ONNX Runtime runner: parity with PyTorch on real mammograms, metadata, errors, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mammo import cascade
from mammo.weights import checkpoints
from mammo import imaging
from mammo.cli import onnx_backend
from mammo.weights import export, onnx_export
from mammo.weights import runners
from mammo.nn.models import default_model_config

SIZE = (256, 128)  # network size (H, W) for the tests: keeps the DDSM 2:1 aspect, small enough for seconds


def _checkpoint(stage: int, encoder: str = "resnet18", seed: int = 0, size=SIZE) -> dict:
    """A seeded untrained stage checkpoint whose BatchNorm statistics are randomised, so logits are O(1)
    (a fresh model's logits are ~0.05 and would make a 1e-4 tolerance meaningless)."""
    torch.manual_seed(seed)
    config = default_model_config(4 if stage == 1 else 1, encoder_name=encoder)
    from mammo.nn.models import build_model

    model = build_model(config).eval()
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.2 * torch.randn(n, generator=generator))
    model.head.weight.data.mul_(50.0)
    return checkpoints.make_checkpoint(stage=stage, model=model, model_config=config,
                                   preprocess_config=imaging.DEFAULT_PREPROCESS, input_size=size)


def _real_batch(tissue_dir, size=SIZE, n=2) -> np.ndarray:
    """``(n, 1, H, W)`` float32: real DDSM tissue images, preprocessed and letterboxed as the cascade does."""
    images = sorted((tissue_dir / "fgt_seg").glob("*.png"))[:n]
    batch = []
    for path in images:
        pre = imaging.preprocess(imaging.read_image(path).pixels)
        net, _ = imaging.letterbox(pre.image, size)
        batch.append(net.astype(np.float32) / 255.0)
    return np.stack(batch)[:, None]


@pytest.fixture(scope="module")
def stage1():
    return _checkpoint(1, encoder="resnet34")  # the cascade's real architecture


def test_parity_with_pytorch_on_real_images(tissue_dir, stage1, tmp_path):
    path = onnx_export.export_onnx(stage1, tmp_path / "stage1.onnx")
    batch = _real_batch(tissue_dir)
    reference = runners.TorchRunner(checkpoints.model_from_checkpoint(stage1))(batch)
    logits = runners.OnnxRunner(path, threads=1)(batch)
    assert logits.shape == (2, 4) + SIZE and logits.dtype == np.float32
    assert reference.std() > 0.5  # the comparison is on logits of a real scale (a fresh model: ~0.03)
    assert np.abs(logits - reference).max() < 1e-4
    # the tissue map derived from them is the same
    assert (logits.argmax(1) == reference.argmax(1)).mean() > 0.9999


def test_dynamic_batch_and_metadata(stage1, tmp_path):
    path = onnx_export.export_onnx(stage1, tmp_path / "s1.onnx")
    runner = runners.OnnxRunner(path, threads=1)
    assert runner.input_hw == SIZE
    batch = np.random.default_rng(1).random((3, 1) + SIZE, dtype=np.float32)
    out3 = runner(batch)
    out1 = runner(batch[1:2])
    assert out3.shape == (3, 4) + SIZE
    np.testing.assert_allclose(out1[0], out3[1], atol=1e-5)  # items of a batch are independent
    meta = onnx_export.read_onnx_metadata(path)
    assert meta["stage"] == 1 and meta["input_size"] == list(SIZE)
    assert meta["class_names"] == ["background", "adipose", "fgt", "pectoral"]
    assert meta["preprocess_config"] == stage1["preprocess_config"]
    assert "model" not in meta and "optimizer" not in meta
    with pytest.raises(ValueError, match="letterbox"):
        runner(np.zeros((1, 1, 64, 64), np.float32))
    with pytest.raises(FileExistsError, match="overwrite"):
        onnx_export.export_onnx(stage1, path)


def test_dynamic_size_export_accepts_other_sizes(tmp_path):
    checkpoint = _checkpoint(2, size=(128, 128))
    path = onnx_export.export_onnx(checkpoint, tmp_path / "s2.onnx", dynamic_size=True)
    runner = runners.OnnxRunner(path, threads=1)
    assert runner.input_hw is None
    batch = np.random.default_rng(2).random((1, 1, 96, 160), dtype=np.float32)
    assert export.max_logit_difference(checkpoint, path, batch) < 1e-4


def test_cli_exports_both_stages_and_cascade_runs_on_them(tissue_dir, tmp_path, capsys):
    stage1 = _checkpoint(1, seed=3)
    stage2 = _checkpoint(2, seed=4, size=(128, 128))
    checkpoints.save_checkpoint(stage1, tmp_path / "s1.pth")
    checkpoints.save_checkpoint(stage2, tmp_path / "s2.pth")
    out = tmp_path / "onnx"
    args = onnx_backend.get_args_parser().parse_args(
        ["--stage1-weights", str(tmp_path / "s1.pth"), "--stage2-weights", str(tmp_path / "s2.pth"),
         "--output-dir", str(out)])
    assert onnx_backend.main(args) == 0
    assert (out / "stage1.onnx").is_file() and (out / "stage2.onnx").is_file()
    assert "max |logit diff|" in capsys.readouterr().out
    assert onnx_backend.main(args) == 2  # refuses to overwrite

    runner1, meta1 = runners.load_runner(out / "stage1.onnx", "onnxruntime", threads=1)
    runner2, meta2 = runners.load_runner(out / "stage2.onnx", "onnxruntime", threads=1)
    pixels = imaging.read_image(sorted((tissue_dir / "fgt_seg").glob("*.png"))[0]).pixels
    onnx_result = cascade.Cascade(meta1, meta2, stage1_runner=runner1, stage2_runner=runner2)(pixels)
    torch_result = cascade.Cascade(stage1, stage2)(pixels)
    assert onnx_result.tissue_classes.shape == pixels.shape
    assert (onnx_result.tissue_classes == torch_result.tissue_classes).mean() > 0.999
    assert onnx_result.roi_box == torch_result.roi_box
    assert np.abs(onnx_result.lesion_prob - torch_result.lesion_prob).max() < 1e-4


def test_load_runner_errors(tmp_path):
    checkpoint = _checkpoint(2, size=(64, 64))
    path = onnx_export.export_onnx(checkpoint, tmp_path / "s2.onnx")
    with pytest.raises(ValueError, match="backend onnxruntime"):
        runners.load_runner(path, "torch")
    with pytest.raises(ValueError, match="backend must be"):
        runners.make_runner(checkpoint, "tensorrt")
    with pytest.raises(FileNotFoundError):
        runners.OnnxRunner(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="junk.onnx"):
        onnx_export.read_onnx_metadata(tmp_path / "junk.onnx")


def test_settings_from_metadata_errors_and_export_provenance(tmp_path):
    checkpoint = _checkpoint(2, size=(64, 64))
    source = {"checkpoint_sha256": "ab" * 32, "checkpoint_name": "x.pth"}
    data = onnx_export.export_onnx_bytes(checkpoint, source=source)
    runner = runners.OnnxRunner(data, threads=1)
    assert runner.path is None and runner.backend == "onnxruntime"
    settings = onnx_export.settings_from_metadata(runner.metadata, "memory")
    assert settings["opset"] == onnx_export.ONNX_OPSET and settings["source"]["checkpoint_name"] == "x.pth"
    assert settings["stage"] == 2 and settings["input_size"] == [64, 64]
    with pytest.raises(ValueError, match="no 'mammo_cascade.checkpoint' metadata"):
        onnx_export.settings_from_metadata({}, "plain.onnx")
    with pytest.raises(ValueError, match="not JSON"):
        onnx_export.settings_from_metadata({onnx_export.METADATA_KEY: "{broken"}, "bad.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not an onnx model")
    with pytest.raises(ValueError, match="ONNX Runtime cannot load .*junk.onnx"):
        runners.OnnxRunner(tmp_path / "junk.onnx")
