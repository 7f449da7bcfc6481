"""Tests of cascade_segmentation_model.py: both stages on real files, checkpoints, determinism, resume, torchrun.

Everything runs on the CPU at 64x64 pixels with a small encoder (tu-mobilenetv3_small_050: 0.57 M
parameters, random initialisation), 2 batches of 2 images per epoch and no loader workers unless a test is about
workers. Real data: 6 DDSM tissue images and 6 CDD-CESM lesion images from ../shared/data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mammo import cascade
from mammo.cli import train as csm
from mammo.weights import checkpoints
from mammo.training import engine
from mammo import imaging
from mammo.imaging import roi
from mammo.nn import models
from mammo.training import trainer

ROOT = Path(__file__).resolve().parents[1]
SMALL_ENCODER = "tu-mobilenetv3_small_050"


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tissue_csv(tmp_path_factory, tissue_dir) -> Path:
    """4 training + 2 validation DDSM tissue images (absolute paths), one per case."""
    images = sorted((tissue_dir / "fgt_seg").glob("*.png"))[:6]
    rows = [{"image_file_path": str(p), "label_file_path": str(tissue_dir / "fgt_seg_labels" / f"{p.stem}_LI.png"),
             "patient_id": "", "source": "ddsm_tissue", "split": "train" if i < 4 else "val"}
            for i, p in enumerate(images)]
    path = tmp_path_factory.mktemp("tissue") / "tissue_dataset.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def lesion_csv(tmp_path_factory, lesion_dir) -> Path:
    """4 training + 2 validation CDD-CESM images with their lesion masks, plus one test row (never used)."""
    images = sorted((lesion_dir / "images").glob("*.jpg"))[:7]
    rows = [{"image_file_path": str(p), "roi_mask_file_path": str(lesion_dir / "masks" / p.name), "patient_id": "",
             "source": "cdd-cesm", "laterality": "", "view": "", "pathology": "",
             "split": "train" if i < 4 else ("val" if i < 6 else "test")} for i, p in enumerate(images)]
    path = tmp_path_factory.mktemp("lesion") / "unified_segmentation_dataset.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def small_args(out: Path, *extra: str, epochs: int = 2) -> list[str]:
    """Flags of a tiny deterministic CPU run writing under ``out``."""
    return ["--img-size-stage1", "64", "--img-size-stage2", "64", "--batch-size-stage1", "2",
            "--batch-size-stage2", "2", "--epochs-stage1", str(epochs), "--epochs-stage2", str(epochs),
            "--max-batches-per-epoch", "2", "--num-workers", "0", "--encoder", SMALL_ENCODER,
            "--encoder-weights", "none", "--device", "cpu", "--deterministic",
            "--stage1-checkpoint-dir", str(out / "ck1"), "--stage2-checkpoint-dir", str(out / "ck2"),
            "--logdir", str(out / "runs"), *extra]


def run(argv: list[str]) -> int:
    return csm.main(csm.get_args_parser().parse_args(argv))


def history(out: Path, stage: int = 1) -> list[dict]:
    lines = (out / "runs" / f"stage{stage}" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def event_tags(log_dir: Path) -> tuple[dict, list[str]]:
    """Scalars ``{tag: [(step, value)]}`` and image tags of the TensorBoard events in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    return scalars, list(events.Tags()["images"])


@pytest.fixture(scope="module")
def stage1_run(tmp_path_factory, tissue_csv) -> Path:
    """A finished 2-epoch stage-1 run (shared by several tests; they only read it)."""
    out = tmp_path_factory.mktemp("stage1_run")
    assert run(["--train-stage1", "--tissue-csv", str(tissue_csv), *small_args(out)]) == 0
    return out


# --------------------------------------------------------------------------------------------------------- stage 1
def test_stage1_writes_checkpoints_that_rebuild_the_model(stage1_run):
    ck = stage1_run / "ck1"
    assert sorted(p.name for p in ck.glob("*.pth")) == ["best_stage1.pth", "last_stage1.pth", "stage1_epoch1.pth",
                                                        "stage1_epoch2.pth"]
    raw = torch.load(ck / "last_stage1.pth", map_location="cpu", weights_only=True)  # plain types + tensors only
    assert raw["stage"] == 1 and raw["epoch"] == 2 and raw["input_size"] == [64, 64]
    assert raw["class_names"] == ["background", "adipose", "fgt", "pectoral"]
    assert raw["preprocess_config"] == imaging.DEFAULT_PREPROCESS
    assert raw["model_config"]["encoder_name"] == SMALL_ENCODER and raw["model_config"]["classes"] == 4
    assert raw["optimizer"]["state"] and raw["lr_scheduler"]["last_epoch"] == 2
    assert isinstance(raw["rng_state"]["torch"], torch.Tensor)
    json.dumps(raw["args"])  # the arguments are plain JSON types
    assert raw["args"]["tissue_csv"].endswith("tissue_dataset.csv") and "torch" in raw["versions"]
    # best = the epoch with the highest validation FGT Dice
    hist = history(stage1_run)
    best_epoch = max(hist, key=lambda r: r["val/dice_fgt"])["epoch"]
    best = checkpoints.load_checkpoint(ck / "best_stage1.pth")
    assert best["metric_name"] == "val/dice_fgt"
    assert best["epoch"] == best_epoch and best["best_metric"] == pytest.approx(max(r["val/dice_fgt"] for r in hist))
    # the model comes back from the checkpoint alone, with the trained weights
    model, checkpoint = checkpoints.load_stage(ck / "last_stage1.pth")
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["model"][key]), key
    with torch.no_grad():
        assert model(torch.rand(1, 1, 64, 64)).shape == (1, 4, 64, 64)


def test_only_the_last_checkpoint_keeps_the_training_state(stage1_run):
    ck = stage1_run / "ck1"
    last = torch.load(ck / "last_stage1.pth", map_location="cpu", weights_only=True)
    assert set(checkpoints.TRAINING_STATE_KEYS) <= set(last) and last["optimizer"]["state"]
    for name in ("best_stage1.pth", "stage1_epoch1.pth", "stage1_epoch2.pth"):
        lean = torch.load(ck / name, map_location="cpu", weights_only=True)
        assert not set(checkpoints.TRAINING_STATE_KEYS) & set(lean), name  # no optimizer, scheduler, scaler, RNG
        assert lean["model"].keys() == last["model"].keys() and lean["model_config"] == last["model_config"]
        # AdamW's two moments per weight make the full file about three times the weights
        assert (ck / name).stat().st_size < 0.5 * (ck / "last_stage1.pth").stat().st_size, name
    epoch2 = torch.load(ck / "stage1_epoch2.pth", map_location="cpu", weights_only=True)
    assert all(torch.equal(v, last["model"][k]) for k, v in epoch2["model"].items())  # same weights as last
    assert epoch2["epoch"] == last["epoch"] == 2 and epoch2["val_metrics"] == last["val_metrics"]


def test_stage1_tensorboard_tags_args_json_and_summary(stage1_run):
    scalars, images = event_tags(stage1_run / "runs" / "stage1")
    for tag in ("train/loss", "val/loss", "val/dice_fgt", "val/dice_adipose", "val/dice_pectoral",
                "val/dice_background", "lr"):
        assert [step for step, _ in scalars[tag]] == [1, 2], tag
    assert "val/panel_0" in images
    hist = history(stage1_run)
    assert scalars["val/dice_fgt"][1][1] == pytest.approx(hist[1]["val/dice_fgt"], abs=1e-6)
    assert scalars["lr"][0][1] == pytest.approx(1e-3)
    args = json.loads((stage1_run / "runs" / "stage1" / "args.json").read_text())
    assert args["img_size_stage1"] == [64]
    assert args["epochs_stage1"] == 2 and args["train_stage1"] is True


def test_same_seed_same_losses_and_resume_is_bit_identical(tmp_path, tissue_csv, stage1_run):
    base = ["--train-stage1", "--tissue-csv", str(tissue_csv)]
    full = tmp_path / "full"
    assert run(base + small_args(full, epochs=4)) == 0
    # same seed, same flags: the first two epochs of the 4-epoch run repeat the 2-epoch run exactly
    first, again = history(stage1_run), history(full)
    for a, b in zip(first, again[:2]):
        assert (a["train/loss"], a["val/loss"]) == (b["train/loss"], b["val/loss"])
    # another seed gives other losses (the comparison above can fail)
    other = tmp_path / "other"
    assert run(base + small_args(other, "--seed", "7", epochs=1)) == 0
    assert history(other)[0]["train/loss"] != first[0]["train/loss"]
    # a run "killed" after epoch 2 and resumed to epoch 4 gives the uninterrupted run's weights bit for bit
    killed = tmp_path / "killed"
    assert run(base + small_args(killed, epochs=2)) == 0
    assert run(base + small_args(killed, "--resume", epochs=4)) == 0
    resumed = checkpoints.load_checkpoint(killed / "ck1" / "last_stage1.pth")
    straight = checkpoints.load_checkpoint(full / "ck1" / "last_stage1.pth")
    assert resumed["epoch"] == straight["epoch"] == 4
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert [r["train/loss"] for r in history(killed)] == [r["train/loss"] for r in history(full)]
    # only the last 3 epoch checkpoints are kept
    assert sorted(p.name for p in (full / "ck1").glob("stage1_epoch*.pth")) == [
        "stage1_epoch2.pth", "stage1_epoch3.pth", "stage1_epoch4.pth"]
    # resuming a finished stage trains nothing more
    assert run(base + small_args(killed, "--resume", epochs=4)) == 0
    assert len(history(killed)) == 4
    # --keep-epoch-checkpoints 0 writes no epoch file (the demo's setting); best and last stay, and resume works
    none_kept = tmp_path / "none_kept"
    assert run(base + small_args(none_kept, "--keep-epoch-checkpoints", "0", epochs=2)) == 0
    assert run(base + small_args(none_kept, "--resume", "--keep-epoch-checkpoints", "0", epochs=3)) == 0
    assert sorted(p.name for p in (none_kept / "ck1").glob("*.pth")) == ["best_stage1.pth", "last_stage1.pth"]
    assert checkpoints.load_checkpoint(none_kept / "ck1" / "last_stage1.pth")["epoch"] == 3


def test_spawned_workers_give_the_same_epoch(tmp_path, tissue_csv, stage1_run):
    out = tmp_path / "spawn"
    argv = ["--train-stage1", "--tissue-csv", str(tissue_csv), *small_args(out, epochs=1)]
    argv[argv.index("--num-workers") + 1] = "1"
    assert run(argv + ["--worker-start-method", "spawn"]) == 0
    # augmentation is seeded per (seed, epoch, item), so a worker process repeats the in-process epoch exactly
    assert history(out)[0]["train/loss"] == history(stage1_run)[0]["train/loss"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tissue_csv, monkeypatch, capsys):
    calls = {"n": 0}
    real_penalty = engine.l1_penalty

    def penalty_nan_in_epoch_2(model, l1_lambda):
        calls["n"] += 1  # 2 steps per epoch: call 3 is epoch 2, step 1
        value = real_penalty(model, l1_lambda)
        return value * float("nan") if calls["n"] >= 3 else value

    monkeypatch.setattr(engine, "l1_penalty", penalty_nan_in_epoch_2)
    out = tmp_path / "nan"
    assert (run(["--train-stage1", "--tissue-csv", str(tissue_csv), *small_args(out, epochs=3)])
            == csm.EXIT_NONFINITE_LOSS)
    message = capsys.readouterr().err
    assert "epoch 2, step 1" in message and "last good checkpoint" in message and "last_stage1.pth" in message
    assert checkpoints.load_checkpoint(out / "ck1" / "last_stage1.pth")["epoch"] == 1
    assert not (out / "ck1" / "stage1_epoch2.pth").exists()


def test_bad_arguments_and_existing_runs_are_refused(tmp_path, tissue_csv, stage1_run, capsys):
    base = ["--train-stage1", "--tissue-csv", str(tissue_csv)]
    assert run(base + small_args(stage1_run)) == csm.EXIT_INPUT_ERROR  # outputs of an earlier run
    assert "--resume" in capsys.readouterr().err
    argv = base + small_args(tmp_path / "a")
    argv[argv.index("--img-size-stage1") + 1] = "100"
    assert run(argv) == csm.EXIT_INPUT_ERROR
    assert "96x96" in capsys.readouterr().err  # names the nearest valid size
    argv = base + small_args(tmp_path / "b")
    argv[argv.index("--batch-size-stage1") + 1] = "1"
    assert run(argv) == csm.EXIT_INPUT_ERROR
    assert "BatchNorm" in capsys.readouterr().err
    assert run(["--train-stage1", *small_args(tmp_path / "c")]) == csm.EXIT_INPUT_ERROR
    assert "--tissue-csv" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):  # one of the three stage flags is required
        csm.get_args_parser().parse_args(["--tissue-csv", str(tissue_csv)])


def test_bad_tables_offline_weights_and_resume_without_a_run_are_errors_not_tracebacks(tmp_path, tissue_csv, capsys,
                                                                                        monkeypatch):
    table = pd.read_csv(tissue_csv)
    missing = table.copy()
    missing.loc[1, "image_file_path"] = str(tmp_path / "gone_1.png")
    missing.loc[4, "label_file_path"] = str(tmp_path / "gone_4_LI.png")
    missing.to_csv(tmp_path / "missing.csv", index=False)
    assert run(["--train-stage1", "--tissue-csv", str(tmp_path / "missing.csv"),
                *small_args(tmp_path / "m")]) == csm.EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    # all listed up front
    assert "2 file(s) that do not exist" in err and "gone_1.png" in err and "gone_4_LI.png" in err
    table.rename(columns={"label_file_path": "label_path"}).to_csv(tmp_path / "badcol.csv", index=False)
    assert run(["--train-stage1", "--tissue-csv", str(tmp_path / "badcol.csv"),
                *small_args(tmp_path / "c")]) == csm.EXIT_INPUT_ERROR
    assert "label_file_path" in capsys.readouterr().err
    assert run(["--train-stage1", "--tissue-csv", str(tissue_csv), *small_args(tmp_path / "r", "--resume")]) \
        == csm.EXIT_INPUT_ERROR
    assert "nothing to resume from" in capsys.readouterr().err

    def offline(*_args, **_kwargs):
        raise RuntimeError("could not load ImageNet weights ... use --encoder-weights none")

    monkeypatch.setattr(trainer, "build_model", offline)
    argv = ["--train-stage1", "--tissue-csv", str(tissue_csv), *small_args(tmp_path / "w")]
    assert run(argv) == csm.EXIT_INPUT_ERROR
    assert "--encoder-weights none" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- stage 2
class ThresholdTissue(nn.Module):
    """A fixed "stage 1" for tests: 1x1 convolution; background below 0.1, FGT above ``fgt_level``, adipose between."""

    def __init__(self, in_channels: int = 1, classes: int = 4, fgt_level: float = 0.6):
        super().__init__()
        self.head = nn.Conv2d(in_channels, classes, 1)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([-10.0, 0.0, 10.0, -100.0]).view(4, 1, 1, 1))
            self.head.bias.copy_(torch.tensor([1.0, 0.0, -10.0 * fgt_level, 0.0]))

    def forward(self, x):
        return self.head(x)


def fake_stage1(path: Path, fgt_level: float) -> Path:
    model = ThresholdTissue(fgt_level=fgt_level)
    state = checkpoints.make_checkpoint(stage=1, model=model,
                                        model_config={"name": "threshold_test", "fgt_level": fgt_level},
                                        preprocess_config=imaging.DEFAULT_PREPROCESS, input_size=(64, 64))
    return checkpoints.save_checkpoint(state, path)


def test_stage2_trains_on_crops_made_by_stage1(tmp_path, lesion_csv, monkeypatch, capsys):
    monkeypatch.setitem(models.MODEL_REGISTRY, "threshold_test", ThresholdTissue)
    stage1 = fake_stage1(tmp_path / "stage1_a.pth", 0.6)
    out = tmp_path / "s2"
    argv = ["--train-stage2", "--cancer-csv", str(lesion_csv), "--stage1-checkpoint", str(stage1), *small_args(out)]
    assert run(argv) == 0
    printed = capsys.readouterr().out
    assert "ROI lesion coverage" in printed
    folders = sorted((out / "ck2" / "roi_crops").iterdir())
    assert len(folders) == 1
    crops = pd.read_csv(folders[0] / "crops.csv", keep_default_na=False)
    assert len(crops) == 6 and set(crops["split"]) == {"train", "val"}  # the test row is never cropped
    # every crop is exactly what the inference code (Cascade.tissue_and_roi) gives with this stage 1
    runner = cascade.Cascade(checkpoints.load_checkpoint(stage1))
    inside = {"train": [0, 0], "val": [0, 0]}
    smaller = 0
    for row in crops.itertuples():
        pixels = imaging.read_image(row.original_image_file_path).pixels
        found = runner.tissue_and_roi(pixels)
        box = found.roi_box
        assert (row.roi_y0, row.roi_x0, row.roi_y1, row.roi_x1) == (box.y0, box.x0, box.y1, box.x1)
        assert row.roi_source == found.roi_source and bool(row.flipped) == found.flipped
        crop = imaging.read_image(folders[0] / row.image_file_path).pixels
        assert np.array_equal(crop, found.image[box.slices()])
        # the mask in the preprocessed frame (the working scale and the mirror of the image it crops)
        mask = found.pre.to_working(imaging.read_mask(row.original_roi_mask_file_path), "nearest")
        assert np.array_equal(imaging.read_mask(folders[0] / row.roi_mask_file_path), mask[box.slices()])
        assert (row.lesion_pixels_inside, row.lesion_pixels_total) == (mask[box.slices()].sum(), mask.sum())
        inside[row.split][0] += int(mask[box.slices()].sum())
        inside[row.split][1] += int(mask.sum())
        smaller += box.height * box.width < pixels.size
    assert smaller >= 1  # the ROI is a real crop for some images, not the whole image
    # ROI coverage is logged for both splits, with the value counted here
    scalars, _ = event_tags(out / "runs" / "stage2")
    for split, (hit, total) in inside.items():
        assert scalars[f"stage2/roi_lesion_coverage_{split}"][0][1] == pytest.approx(hit / total, rel=1e-6)
    assert scalars["stage2/roi_lesion_coverage"][0][1] == pytest.approx(
        sum(h for h, _ in inside.values()) / sum(t for _, t in inside.values()), rel=1e-6)
    for tag in ("train/loss", "val/loss", "val/dice_lesion", "lr"):
        assert [s for s, _ in scalars[tag]] == [1, 2], tag
    # the stage-2 checkpoint rebuilds its model and carries what inference needs
    model, checkpoint = checkpoints.load_stage(out / "ck2" / "best_stage2.pth")
    assert checkpoint["stage"] == 2 and checkpoint["class_names"] == ["lesion"]
    assert checkpoint["roi"]["margin_fraction"] == pytest.approx(roi.ROI_MARGIN_FRACTION)
    assert checkpoint["preprocess_config"] == imaging.DEFAULT_PREPROCESS
    result = cascade.Cascade(checkpoints.load_checkpoint(stage1), checkpoint)(pixels)
    assert result.lesion_prob.shape == pixels.shape
    # the same stage 1 reuses the cache; another stage 1 makes new crops
    assert run(["--train-stage2", "--cancer-csv", str(lesion_csv), "--stage1-checkpoint", str(stage1),
                *small_args(tmp_path / "s2b", epochs=1)]) == 0
    assert "ROI crops reused" not in capsys.readouterr().out  # a new --stage2-checkpoint-dir holds no cache yet
    assert run(argv + ["--resume", "--epochs-stage2", "3"]) == 0
    assert "ROI crops reused" in capsys.readouterr().out
    stage1_b = fake_stage1(tmp_path / "stage1_b.pth", 0.7)
    argv_b = ["--train-stage2", "--cancer-csv", str(lesion_csv), "--stage1-checkpoint", str(stage1_b),
              *small_args(out, "--overwrite", epochs=1)]
    assert run(argv_b) == 0
    assert len(list((out / "ck2" / "roi_crops").iterdir())) == 2


def test_stage2_encoder_can_start_from_stage1(tmp_path, tissue_csv):
    args = csm.get_args_parser().parse_args(["--train-stage2", "--encoder", "resnet18"])
    stage1_model = models.build_model(trainer.model_config_for(1, args, None))
    state = checkpoints.make_checkpoint(stage=1, model=stage1_model,
                                        model_config=trainer.model_config_for(1, args, None),
                                        preprocess_config=imaging.DEFAULT_PREPROCESS, input_size=(64, 64))
    path = checkpoints.save_checkpoint(state, tmp_path / "best_stage1.pth")
    stage2_model = models.build_model(trainer.model_config_for(2, args, str(path)))
    encoder1, encoder2 = stage1_model.encoder.state_dict(), stage2_model.encoder.state_dict()
    assert encoder1.keys() == encoder2.keys()
    assert all(torch.equal(encoder1[k], encoder2[k]) for k in encoder1)
    assert stage2_model.head.out_channels == 1


# ------------------------------------------------------------------------------------------------- distributed
def test_torchrun_two_gloo_processes_only_rank0_writes(tmp_path, tissue_csv):
    out = tmp_path / "ddp"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            str(ROOT / "cascade_segmentation_model.py"), "--train-stage1", "--tissue-csv", str(tissue_csv),
            *small_args(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # one process logs: one summary line per epoch, one TensorBoard event file
    summaries = [line for line in done.stdout.splitlines() if line.startswith("stage 1 | epoch")]
    assert len(summaries) == 2, done.stdout
    assert len(list((out / "runs" / "stage1").glob("events.out.tfevents.*"))) == 1
    assert sorted(p.name for p in (out / "ck1").iterdir()) == [
        "best_stage1.pth", "last_stage1.pth", "stage1_epoch1.pth", "stage1_epoch2.pth"]
    checkpoint = checkpoints.load_checkpoint(out / "ck1" / "last_stage1.pth")
    assert checkpoint["epoch"] == 2 and not any(k.startswith("module.") for k in checkpoint["model"])
    # each process trains on its half (2 of 4 images: one batch); validation counts each image once over both
    first = history(out)[0]
    assert (first["train/steps"], first["train/images"], first["val/images"]) == (1, 2, 2)


# ------------------------------------------------------------------------------------------------------ helpers
def test_epoch_sampler_shards_and_seeds_per_epoch():
    shards = [engine.EpochSampler(7, seed=3, shuffle=True, rank=r, world_size=2) for r in range(2)]
    for s in shards:
        s.set_epoch(5)
    keys = [list(s) for s in shards]
    assert len(keys[0]) == len(keys[1]) == 4  # padded to 8
    assert {i for shard in keys for i, _ in shard} == set(range(7))
    again = engine.EpochSampler(7, seed=3, shuffle=True, rank=0, world_size=2)
    again.set_epoch(5)
    assert list(again) == keys[0]  # a pure function of (seed, epoch): no hidden RNG state
    again.set_epoch(6)
    assert [i for i, _ in again] != [i for i, _ in keys[0]] or [k for _, k in again] != [k for _, k in keys[0]]
    val = [list(engine.EpochSampler(5, seed=3, shuffle=False, rank=r, world_size=2)) for r in range(2)]
    assert [i for i, _ in val[0]] == [0, 2, 4] and [i for i, _ in val[1]] == [1, 3]


def test_rng_state_round_trip_with_weights_only(tmp_path):
    engine.seed_everything(11, deterministic=False)
    state = engine.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    np.random.rand(5), torch.rand(5)
    engine.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (np.random.rand(), torch.rand(1).item(), __import__("random").random()) == expected


def test_patience_stops_early_and_resume_knows_it(tmp_path, tissue_csv, monkeypatch, capsys):
    def flat_evaluate(model, criterion, loader, device, num_classes, args, ctx, panels=0):
        return {"loss": 1.0, "dice": [0.5] * num_classes, "pixel_accuracy": 0.5, "images": 2, "panels": []}

    monkeypatch.setattr(trainer, "evaluate", flat_evaluate)  # never better after epoch 1
    out = tmp_path / "patience"
    argv = ["--train-stage1", "--tissue-csv", str(tissue_csv), *small_args(out, "--patience", "1", epochs=5)]
    assert run(argv) == 0
    assert "early stop after epoch 2" in capsys.readouterr().out
    last = checkpoints.load_checkpoint(out / "ck1" / "last_stage1.pth")
    assert last["epoch"] == 2 and last["early_stopped"] and last["epochs_since_best"] == 1
    assert checkpoints.load_checkpoint(out / "ck1" / "best_stage1.pth")["epoch"] == 1
    assert run(argv + ["--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out and len(history(out)) == 2
