"""The cascade's geometry and checkpoints: ROI box by hand, paste-back, orientation, atomic weights-only checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mammo import imaging
from mammo.weights import runners
from mammo.cascade import Cascade
from mammo.weights.checkpoints import (TRAINING_STATE_KEYS, load_checkpoint, load_stage, make_checkpoint,
                                       save_checkpoint, without_training_state)
from mammo.core.labels import FGT
from mammo.imaging.roi import RoiBox, fgt_roi_box, paste_into_box
from mammo.nn.models import build_model, default_model_config


def test_fgt_roi_box_by_hand():
    classes = np.zeros((100, 80), np.uint8)
    classes[10:90, 0:60] = 1  # adipose
    classes[40:60, 20:40] = FGT  # a 20 x 20 FGT block
    box, source = fgt_roi_box(classes, margin_fraction=0.1, min_side=1)
    assert source == "fgt"
    assert box == RoiBox(38, 18, 62, 42)  # 2-pixel margin (10 % of 20) on every side
    box, _ = fgt_roi_box(classes, margin_fraction=0.0, min_side=32)
    assert (box.height, box.width) == (32, 32) and box.y0 <= 40 and box.y1 >= 60  # grown about the block


def test_fgt_roi_box_falls_back_to_breast_then_image_and_clips():
    classes = np.zeros((50, 40), np.uint8)
    classes[5:45, 0:30] = 1
    box, source = fgt_roi_box(classes, margin_fraction=0.5, min_side=1)
    assert source == "breast" and box == RoiBox(0, 0, 50, 40)  # a 50 % margin is clipped to the image
    box, source = fgt_roi_box(np.zeros((50, 40), np.uint8))
    assert source == "image" and box == RoiBox(0, 0, 50, 40)


def test_paste_into_box_is_zero_outside_and_mirrors_consistently():
    box = RoiBox(2, 3, 5, 7)
    full = paste_into_box(np.ones((3, 4), np.float32), box, (8, 10))
    assert full.sum() == 12 and full[box.slices()].min() == 1
    mirrored = box.mirrored(10)
    assert np.array_equal(full[:, ::-1] > 0, paste_into_box(np.ones((3, 4), np.float32), mirrored, (8, 10)) > 0)
    with pytest.raises(ValueError, match="do not fit"):
        paste_into_box(np.ones((2, 2)), box, (8, 10))


def _checkpoint(stage: int, size=(64, 64)) -> dict:
    torch.manual_seed(stage)
    config = default_model_config(classes=4 if stage == 1 else 1)
    return make_checkpoint(stage=stage, model=build_model(config), model_config=config,
                           preprocess_config=imaging.DEFAULT_PREPROCESS, input_size=size, epoch=3, best_metric=0.5,
                           args={"seed": 1, "paths": ["a", "b"]})


def test_checkpoint_round_trip_is_weights_only_and_rebuilds_the_model(tmp_path):
    checkpoint = _checkpoint(1)
    path = save_checkpoint(checkpoint, tmp_path / "sub" / "best_stage1.pth")
    assert [p.name for p in path.parent.iterdir()] == ["best_stage1.pth"]  # no temporary file left behind
    torch.load(path, weights_only=True)  # plain types and tensors only
    model, loaded = load_stage(path)
    assert loaded["class_names"] == ["background", "adipose", "fgt", "pectoral"]
    assert loaded["input_size"] == [64, 64] and loaded["epoch"] == 3 and loaded["stage"] == 1
    reference = build_model(default_model_config(4))
    reference.load_state_dict(checkpoint["model"])
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model(x), reference.eval()(x))


def test_checkpoint_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "broken.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="broken.pth"):
        load_checkpoint(tmp_path / "broken.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="missing keys"):
        load_checkpoint(tmp_path / "other.pth")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint({"a": torch.ones(2)}, tmp_path / "last.pth")

    def crash(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def _bright_is_fgt(batch: np.ndarray) -> np.ndarray:
    """Fake stage 1: FGT where the network input is brighter than 0.5, background elsewhere."""
    logits = np.zeros((batch.shape[0], 4) + batch.shape[2:], np.float32)
    logits[:, FGT] = np.where(batch[:, 0] > 0.5, 10.0, -10.0)
    return logits


def _lesion_everywhere(batch: np.ndarray) -> np.ndarray:
    return np.full((batch.shape[0], 1) + batch.shape[2:], 8.0, np.float32)


def test_cascade_outputs_are_at_original_size_orientation_and_zero_outside_the_roi():
    # A 300 x 170 "mammogram" with the breast on the right (so preprocessing mirrors it) and a bright FGT block.
    image = np.zeros((300, 170), np.uint8)
    image[20:280, 60:170] = 90
    image[100:160, 120:150] = 250
    run = Cascade(_checkpoint(1, (64, 32)), _checkpoint(2, (32, 32)), stage1_runner=_bright_is_fgt,
                  stage2_runner=_lesion_everywhere)
    result = run(image)
    assert result.flipped
    assert result.tissue_classes.shape == image.shape and result.lesion_prob.shape == image.shape
    fgt_rows, fgt_cols = np.nonzero(result.fgt_mask)
    # the FGT found lies on the bright block in the input's own orientation (within letterbox rounding)
    assert abs(fgt_rows.min() - 100) <= 6 and abs(fgt_rows.max() - 159) <= 6
    assert abs(fgt_cols.min() - 120) <= 6 and abs(fgt_cols.max() - 149) <= 6
    inside = np.zeros(image.shape, bool)
    inside[result.roi_box.slices()] = True
    assert result.roi_source == "fgt"
    assert np.all(result.lesion_prob[~inside] == 0.0)
    assert result.lesion_prob[inside].min() > 0.99
    assert result.roi_box.x0 <= 120 and result.roi_box.x1 >= 150  # box in original (unmirrored) coordinates
    assert set(result.timings_s) == {"preprocess", "stage1", "stage2"}


def test_cascade_with_real_models_keeps_16bit_input_size(nyu_dir):
    pixels = imaging.read_image(nyu_dir / "images" / "0_R-CC.png").pixels
    run = Cascade(_checkpoint(1, (64, 32)), _checkpoint(2, (32, 32)))
    result = run(pixels)
    assert result.tissue_classes.shape == pixels.shape == result.lesion_prob.shape
    assert result.tissue_classes.max() <= 3
    outside = np.ones(pixels.shape, bool)
    outside[result.roi_box.slices()] = False
    assert np.all(result.lesion_prob[outside] == 0.0)
    assert 0.0 <= result.lesion_prob.min() and result.lesion_prob.max() <= 1.0


def test_resolve_device():
    assert runners.resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert runners.resolve_device("auto").type == "cpu"
        with pytest.raises(RuntimeError, match="--device cpu"):
            runners.resolve_device("cuda")


def test_run_batch_equals_one_image_at_a_time(tissue_dir, nyu_dir):
    images = [imaging.read_image(p).pixels for p in sorted((tissue_dir / "fgt_seg").glob("*.png"))[:2]]
    images.append(imaging.read_image(nyu_dir / "images" / "0_R-MLO.png").pixels)  # 16-bit, another size
    images.append(images[0][:, ::-1].copy())  # mirrored: another orientation in the same batch
    run = Cascade(_checkpoint(1, (64, 32)), _checkpoint(2, (32, 32)))
    batched = run.run_batch(images)
    assert len(batched) == 4 and run.run_batch([]) == []
    for pixels, together in zip(images, batched):
        alone = run(pixels)
        assert together.tissue_classes.shape == pixels.shape
        assert np.array_equal(together.tissue_classes, alone.tissue_classes)
        assert together.roi_box == alone.roi_box and together.flipped == alone.flipped
        assert np.allclose(together.lesion_prob, alone.lesion_prob, atol=1e-5)


def test_swapped_checkpoints_are_refused():
    with pytest.raises(ValueError, match="swap --stage1-weights and --stage2-weights"):
        Cascade(_checkpoint(2, (32, 32)), _checkpoint(1, (64, 32)))
    with pytest.raises(ValueError, match="stage-1 checkpoint given holds stage 2"):
        Cascade(_checkpoint(2, (32, 32)), None)


def _trained_state(stage: int = 1, size=(64, 64)) -> tuple[dict, torch.nn.Module]:
    """A checkpoint as training writes its ``last`` file (and as every file was written before lean checkpoints):
    weights after one AdamW step, with optimizer, scheduler, scaler and RNG states."""
    torch.manual_seed(stage)
    config = default_model_config(4 if stage == 1 else 1, encoder_name="resnet18")
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=10)
    model(torch.rand(2, 1, *size)).mean().backward()
    optimizer.step()
    scheduler.step()
    state = make_checkpoint(stage=stage, model=model, model_config=config, preprocess_config=imaging.DEFAULT_PREPROCESS,
                            input_size=size, epoch=1, best_metric=0.5, optimizer=optimizer, lr_scheduler=scheduler,
                            scaler=torch.amp.GradScaler("cuda", enabled=False),
                            rng_state={"torch": torch.get_rng_state()})
    return state, model.eval()


def test_lean_checkpoint_keeps_weights_and_settings_only(tmp_path):
    state, _ = _trained_state()
    lean = without_training_state(state)
    assert not set(TRAINING_STATE_KEYS) & set(lean) and set(TRAINING_STATE_KEYS) <= set(state)
    assert lean["model"] is state["model"] and lean["model_config"] == state["model_config"]
    full_path = save_checkpoint(state, tmp_path / "last_stage1.pth")
    lean_path = save_checkpoint(lean, tmp_path / "best_stage1.pth")
    # AdamW keeps two moments per weight: the lean file is about a third of the full one
    assert lean_path.stat().st_size < 0.4 * full_path.stat().st_size
    x = torch.rand(1, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(load_stage(lean_path)[0](x), load_stage(full_path)[0](x))


def test_old_checkpoint_with_training_state_still_loads_and_runs(tmp_path):
    state, model = _trained_state(stage=2)
    path = save_checkpoint(state, tmp_path / "best_stage2.pth")  # the pre-lean format: training state in every file
    loaded = load_checkpoint(path)
    assert loaded["optimizer"]["state"] and loaded["lr_scheduler"]["last_epoch"] == 1
    batch = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    with torch.inference_mode():
        expected = model(torch.from_numpy(batch)).numpy()
    for backend in ("torch", "onnxruntime"):
        runner, _ = runners.load_runner(path, backend, "cpu", threads=1, onnx_cache=False)
        assert np.abs(runner(batch) - expected).max() < 1e-4, backend
