"""Model files (``release.py``): float16 safetensors export and its round trip, one-line errors, loading through
every route (``checkpoints.load_checkpoint``, both backends of ``runners.load_runner`` with the ONNX export cache),
the shipped default model used by ``cascade_inference.py`` and ``evaluate.py`` when no weights are given
(``MAMMO_WEIGHTS_DIR`` points them to a folder of test weights), the stage-2 model's lesion threshold, and the
export script. The networks are the untrained ones of ``conftest.checkpoint_dir``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from mammo.cli import infer as ci
from mammo.weights import checkpoints
from mammo.cli import evaluate
from mammo.core import fileio
from mammo.core import labels
from mammo.weights import release
from mammo.weights import runners

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import export_weights as export_script # noqa: E402

EXTRA = {"training_data": "untrained test networks", "recipe": "conftest.checkpoint_dir", "commit": "0123456789abcdef",
         "date": "2025-01-31T12:00:00Z"}
#: A real image (960x480 screen-film PNG) under ../shared/data.
TISSUE_IMAGE = Path("tissue/train_valid/fgt_seg/A_0002_1.RIGHT_MLO.png")


def _checkpoint(checkpoint_dir: Path, stage: int) -> dict:
    return checkpoints.load_checkpoint(checkpoint_dir / f"stage{stage}" / f"best_stage{stage}.pth")


@pytest.fixture(scope="module")
def weights_dir(checkpoint_dir, tmp_path_factory) -> Path:
    """Both test stages exported as stage1.safetensors / stage2.safetensors (no lesion threshold carried)."""
    folder = tmp_path_factory.mktemp("weights")
    for stage in (1, 2):
        release.export_weights(_checkpoint(checkpoint_dir, stage),
                                   folder / release.DEFAULT_WEIGHTS_NAMES[stage], EXTRA)
    return folder


@pytest.fixture(scope="module")
def weights_with_threshold(checkpoint_dir, weights_dir, tmp_path_factory) -> Path:
    """Both test stages exported, stage 2 carrying lesion_threshold 0.3 and min_lesion_area 2."""
    folder = tmp_path_factory.mktemp("weights_t")
    shutil.copyfile(weights_dir / "stage1.safetensors", folder / "stage1.safetensors")
    checkpoint = dict(_checkpoint(checkpoint_dir, 2), lesion_threshold=0.3, min_lesion_area=2)
    release.export_weights(checkpoint, folder / "stage2.safetensors", EXTRA)
    return folder


def _one_line_error(excinfo, name: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and name in message, message
    return message


# ------------------------------------------------------------------------------------------------- the format
def test_export_load_round_trip(checkpoint_dir, weights_dir):
    for stage in (1, 2):
        original = _checkpoint(checkpoint_dir, stage)
        path = weights_dir / release.DEFAULT_WEIGHTS_NAMES[stage]
        loaded = release.load_weights(path, stage)
        # the weights: equal to float16 precision, float32 in memory, integer buffers unchanged
        assert loaded["model"].keys() == original["model"].keys()
        float_values = 0
        for name, tensor in original["model"].items():
            back = loaded["model"][name]
            if tensor.is_floating_point():
                assert back.dtype == torch.float32
                assert torch.equal(back, tensor.to(torch.float16).to(torch.float32)), name
                float_values += tensor.numel()
            else:
                assert back.dtype == tensor.dtype and torch.equal(back, tensor), name
        # on disk: float16, integer buffers in their dtype, the size of the float16 values plus a small header
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                dtype = handle.get_slice(name).get_dtype()
                assert dtype == ("F16" if original["model"][name].is_floating_point() else "I64"), (name, dtype)
        size = path.stat().st_size
        assert 2 * float_values < size < 2 * float_values + 1_000_000
        # every setting and metadata entry back, equal
        for key in (*release.REQUIRED_KEYS, *release.OPTIONAL_KEYS):
            if key in original:
                assert loaded[key] == json.loads(json.dumps(original[key])), key
        assert ("roi" in loaded) == (stage == 2)
        assert loaded["metadata"] == {"format": release.WEIGHTS_FORMAT, **EXTRA}
        assert not set(loaded) & {"optimizer", "lr_scheduler", "scaler", "rng_state", "args"}
        # the same through checkpoints.load_checkpoint, and the model rebuilt from it runs like the original
        assert checkpoints.load_checkpoint(path)["metadata"] == loaded["metadata"]
        model = checkpoints.model_from_checkpoint(loaded)
        reference = checkpoints.model_from_checkpoint(original)
        x = torch.rand(1, 1, *original["input_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(model(x), reference(x), atol=0.05)
        assert release.read_settings(path)["metadata"] == loaded["metadata"]


def test_recognised_by_header_and_reexported_with_its_metadata(weights_dir, tmp_path):
    renamed = tmp_path / "stage2.bin"
    shutil.copyfile(weights_dir / "stage2.safetensors", renamed)
    assert release.is_weights_file(renamed)
    loaded = checkpoints.load_checkpoint(renamed)
    assert loaded["stage"] == 2 and loaded["metadata"]["commit"] == EXTRA["commit"]
    again = release.export_weights(loaded, tmp_path / "again.safetensors", {"recipe": "re-exported"})
    assert release.read_settings(again)["metadata"] == {"format": release.WEIGHTS_FORMAT,
                                                          **EXTRA, "recipe": "re-exported"}
    assert (tmp_path / "again.safetensors").read_bytes()[8:].find(b"re-exported") > 0
    with pytest.raises(FileExistsError):
        release.export_weights(loaded, again, overwrite=False)
    with pytest.raises(release.WeightsFileError, match="reserved"):
        release.export_weights(loaded, tmp_path / "x.safetensors", {"stage": 1})
    for other in (weights_dir.parent, ROOT / "checkpoints.py"):
        assert not release.is_weights_file(other)


def test_wrong_files_are_one_line_errors(weights_dir, tmp_path):
    stage2 = weights_dir / "stage2.safetensors"
    with pytest.raises(release.WeightsFileError) as excinfo:
        release.load_weights(stage2, stage=1)
    assert "stage-2" in _one_line_error(excinfo, "stage2.safetensors")

    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes, not a model\n")
    for load in (release.load_weights, checkpoints.load_checkpoint, release.read_settings):
        with pytest.raises(ValueError) as excinfo:
            load(text)
        assert "not a safetensors file" in _one_line_error(excinfo, "notes.safetensors")

    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(release.WeightsFileError) as excinfo:
        checkpoints.load_checkpoint(bare)
    assert "without this suite's metadata" in _one_line_error(excinfo, "bare.safetensors")

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(stage2.read_bytes()[:4_000_000])
    assert release.read_settings(truncated)["stage"] == 2  # the header is whole
    with pytest.raises(release.WeightsFileError) as excinfo:
        release.load_weights(truncated)
    _one_line_error(excinfo, "truncated.safetensors")

    with pytest.raises(FileNotFoundError):
        release.load_weights(tmp_path / "none.safetensors")

    with pytest.raises(release.WeightsFileError, match="float16"):
        checkpoint = release.load_weights(stage2)
        next(t for t in checkpoint["model"].values() if t.is_floating_point()).view(-1)[0] = 1e6
        release.export_weights(checkpoint, tmp_path / "big.safetensors")


def test_a_text_file_as_weights_is_one_line_on_the_command_line(tmp_path, weights_dir, shared_data, capsys):
    text = tmp_path / "notes.safetensors"
    text.write_text("these are my notes\n")
    argv = ["--stage1-weights", str(text), "--stage2-weights", str(weights_dir / "stage2.safetensors"),
            "--image", str(shared_data / TISSUE_IMAGE), "--output-dir", str(tmp_path / "out"), "--device", "cpu"]
    assert ci.main(ci.get_args_parser().parse_args(argv)) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "notes.safetensors" in lines[0], lines


def test_lesion_settings_resolution():
    """One rule and one range for every script (issue 18): the user's value, else the model's, else 0.5 / 1 px;
    a threshold in (0, 1) and a whole number of pixels >= 1, from the user and from the model alike."""
    resolve, Settings = release.resolve_lesion_settings, release.LesionSettings
    assert resolve(None) == Settings(0.5, 1, ())
    assert resolve({"lesion_threshold": 0.3}) == Settings(0.3, 1, ("lesion_threshold",))
    assert resolve({"lesion_threshold": 0.3, "min_lesion_area": 4}, 0.6, None) == Settings(0.6, 4, ("min_lesion_area",))
    assert resolve({"min_lesion_area": 4.0}, None, 7) == Settings(0.5, 7, ())
    for bad in ({"lesion_threshold": 1.5}, {"lesion_threshold": 1.0}, {"lesion_threshold": 0},
                {"lesion_threshold": "high"}, {"min_lesion_area": 2.5}, {"min_lesion_area": -1},
                {"min_lesion_area": 0}, {"min_lesion_area": True}):
        with pytest.raises(release.WeightsFileError, match="pass --"):
            resolve(bad)
    for threshold, area, flag in ((1.0, None, "--threshold"), (0.0, None, "--threshold"),
                                  (None, 0, "--min-lesion-area"), (float("nan"), None, "--threshold")):
        with pytest.raises(ValueError, match=flag):
            resolve(None, threshold, area)


# ------------------------------------------------------------------------------------------------ the runners
def test_both_backends_and_the_onnx_cache_beside_a_read_only_folder(weights_with_threshold, tmp_path, monkeypatch):
    source = tmp_path / "ro"
    source.mkdir()
    path = Path(shutil.copy(weights_with_threshold / "stage2.safetensors", source / "stage2.safetensors"))
    batch = np.random.default_rng(0).random((1, 1, 64, 64), dtype=np.float32)
    torch_runner, checkpoint = runners.load_runner(path, "torch", "cpu")
    assert checkpoint["lesion_threshold"] == 0.3 and checkpoint["metadata"]["commit"] == EXTRA["commit"]

    real_write = fileio.atomic_write_bytes

    def read_only(target, data, overwrite=True):  # the folder of ``path`` cannot be written (tests run as root)
        if Path(target).parent == source:
            raise PermissionError(13, "Permission denied", str(target))
        return real_write(target, data, overwrite)

    monkeypatch.setattr(fileio, "atomic_write_bytes", read_only)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    onnx_runner, settings = runners.load_runner(path, "onnxruntime", "cpu")
    expected = runners.onnx_cache_dir() / runners.onnx_cache_name(path, fileio.file_sha256(path))
    assert onnx_runner.path == expected and expected.is_file() and not list(source.glob("*.onnx"))
    # the settings an export does not carry come from the file's header
    assert settings["lesion_threshold"] == 0.3 and settings["min_lesion_area"] == 2
    assert settings["metadata"] == checkpoint["metadata"] and settings["source"]["checkpoint_sha256"]
    np.testing.assert_allclose(onnx_runner(batch), torch_runner(batch), atol=1e-3)
    again, settings_again = runners.load_runner(path, "onnxruntime", "cpu")  # the cached export, reused
    assert again.path == expected and settings_again["lesion_threshold"] == 0.3


# ------------------------------------------------------------------------------------- the shipped default model
def _run_inference(tmp_path, shared_data, *extra) -> tuple[int, dict]:
    out = tmp_path / "pred"
    argv = ["--image", str(shared_data / TISSUE_IMAGE), "--output-dir", str(out), "--device", "cpu",
            "--no-visualization", *extra]
    status = ci.main(ci.get_args_parser().parse_args(argv))
    record = out / f"{TISSUE_IMAGE.stem}.json"
    return status, json.loads(record.read_text(encoding="utf-8")) if record.is_file() else {}


def test_cascade_inference_uses_the_shipped_weights(weights_dir, shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(release.WEIGHTS_DIR_ENV, str(weights_dir))
    status, record = _run_inference(tmp_path, shared_data)
    assert status == 0
    out = capsys.readouterr().out
    assert out.count("using the shipped default model") == 1  # both stages, one provenance: one line (issue 21)
    for stage in (1, 2):
        name = f"stage{stage}.safetensors"
        line = next(line for line in out.splitlines() if line.startswith("using the shipped default model")
                    and name in line.split(" (")[0])
        assert f"trained on {EXTRA['training_data']}" in line and "commit 0123456789ab" in line, line
        assert record["checkpoints"][f"stage{stage}"]["path"] == str((weights_dir / name).resolve())
    assert record["lesions"]["threshold"] == 0.5 and record["lesions"]["min_area_px"] == 1
    for suffix in ("_tissue_seg.png", "_fgt_mask.png", "_cancer_prob.png"):
        assert (tmp_path / "pred" / f"{TISSUE_IMAGE.stem}{suffix}").is_file()


def test_missing_shipped_weights_name_the_path(tmp_path, shared_data, monkeypatch, capsys):
    monkeypatch.setenv(release.WEIGHTS_DIR_ENV, str(tmp_path / "empty"))
    status, _ = _run_inference(tmp_path, shared_data)
    assert status == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no stage-1 checkpoint") and "stage1.safetensors is missing" in err, err
    argv = ["--tissue-dir", str(shared_data / "tissue" / "train_valid"), "--output-dir", str(tmp_path / "eval")]
    assert evaluate.main(evaluate.get_args_parser().parse_args(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "stage1.safetensors is missing" in err, err


def test_the_model_threshold_is_used_unless_the_user_gives_one(weights_with_threshold, shared_data, tmp_path,
                                                               monkeypatch, capsys):
    monkeypatch.setenv(release.WEIGHTS_DIR_ENV, str(weights_with_threshold))
    status, record = _run_inference(tmp_path / "a", shared_data)  # --backend auto: ONNX Runtime here
    assert status == 0 and record["lesions"]["threshold"] == 0.3 and record["lesions"]["min_area_px"] == 2
    assert "using the stage-2 model's lesion_threshold 0.3 and min_lesion_area 2" in capsys.readouterr().out
    status, record = _run_inference(tmp_path / "b", shared_data, "--threshold", "0.7", "--backend", "torch")
    assert status == 0 and record["lesions"]["threshold"] == 0.7 and record["lesions"]["min_area_px"] == 2
    assert "lesion_threshold" not in capsys.readouterr().out


def _run_evaluate(out: Path, shared_data: Path, *extra) -> dict:
    argv = ["--tissue-dir", str(shared_data / "tissue" / "train_valid"), "--lesion-dir",
            str(shared_data / "lesion_cdd_cesm"), "--limit", "1", "--no-plots", "--output-dir", str(out), *extra]
    assert evaluate.main(evaluate.get_args_parser().parse_args(argv)) == 0
    return json.loads((out / "metrics.json").read_text(encoding="utf-8"))


def test_evaluate_uses_the_shipped_weights_and_their_threshold(weights_dir, weights_with_threshold, shared_data,
                                                               tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(release.WEIGHTS_DIR_ENV, str(weights_dir))
    summary = _run_evaluate(tmp_path / "plain", shared_data)
    out = capsys.readouterr().out
    assert out.count("using the shipped default model") == 2 and "stage2.safetensors" in out
    evaluation = summary["evaluation"]
    assert evaluation["stage1_weights"] == str(weights_dir / "stage1.safetensors")
    assert evaluation["shipped_default_weights"] == ["stage1", "stage2"]
    assert evaluation["lesion_threshold"] == 0.5 and evaluation["min_lesion_area_px"] == 1  # one default (issue 18)
    assert summary["tissue"]["n_images"] == 1

    monkeypatch.setenv(release.WEIGHTS_DIR_ENV, str(weights_with_threshold))
    evaluation = _run_evaluate(tmp_path / "model", shared_data)["evaluation"]
    assert evaluation["lesion_threshold"] == 0.3 and evaluation["min_lesion_area_px"] == 2
    assert evaluation["lesion_settings_from_model"] == ["lesion_threshold", "min_lesion_area"]
    evaluation = _run_evaluate(tmp_path / "user", shared_data, "--threshold", "0.6",
                               "--stage1-weights", str(weights_dir / "stage1.safetensors"))["evaluation"]
    assert evaluation["lesion_threshold"] == 0.6 and evaluation["min_lesion_area_px"] == 2
    assert evaluation["shipped_default_weights"] == ["stage2"]


# --------------------------------------------------------------------------------------------- the export script
def test_export_script(checkpoint_dir, tmp_path, capsys):
    out = tmp_path / "weights"
    argv = ["--stage1", str(checkpoint_dir / "stage1" / "best_stage1.pth"),
            "--stage2", str(checkpoint_dir / "stage2" / "best_stage2.pth"), "--output-dir", str(out),
            "--training-data", "test data", "--recipe", "pytest"]
    assert export_script.main(export_script.get_args_parser().parse_args(argv)) == 0
    printed = capsys.readouterr().out
    assert "stage 1:" in printed and "stage 2:" in printed and "MB" in printed
    for stage in (1, 2):
        settings = release.read_settings(out / f"stage{stage}.safetensors", stage)
        metadata = settings["metadata"]
        assert metadata["training_data"] == "test data" and metadata["recipe"] == "pytest"
        assert metadata["date"].endswith("Z") and metadata["source_checkpoint"]["name"] == f"best_stage{stage}.pth"
        if (ROOT / ".git").exists() and shutil.which("git"):
            head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
            assert metadata["commit"] == head.strip()
    assert release.read_settings(out / "stage2.safetensors")["lesion_threshold"] == 0.5
    assert "lesion_threshold" not in release.read_settings(out / "stage1.safetensors")
    before = (out / "stage1.safetensors").stat().st_mtime_ns
    assert export_script.main(export_script.get_args_parser().parse_args(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--overwrite" in err and "\n" not in err
    assert (out / "stage1.safetensors").stat().st_mtime_ns == before
    assert export_script.main(export_script.get_args_parser().parse_args(
        [*argv, "--overwrite", "--lesion-threshold", "0.4"])) == 0
    assert release.read_settings(out / "stage2.safetensors")["lesion_threshold"] == 0.4
    swapped = ["--stage1", argv[3], "--stage2", argv[1], *argv[4:], "--overwrite"]
    assert export_script.main(export_script.get_args_parser().parse_args(swapped)) == 2
    assert "swap" in capsys.readouterr().err

    # a stage 2 that cannot be exported (a weight beyond float16) leaves the existing pair as it was
    checkpoint = checkpoints.load_checkpoint(argv[3])
    next(t for t in checkpoint["model"].values() if t.is_floating_point()).view(-1)[0] = 1e6
    big = checkpoints.save_checkpoint(checkpoint, tmp_path / "big_stage2.pth")
    pair = {name: (out / name).read_bytes() for name in ("stage1.safetensors", "stage2.safetensors")}
    failing = ["--stage1", argv[1], "--stage2", str(big), *argv[4:], "--overwrite", "--recipe", "failing run"]
    assert export_script.main(export_script.get_args_parser().parse_args(failing)) == 2
    err = capsys.readouterr().err.strip()
    assert "float16" in err and "nothing was written" in err and "\n" not in err
    assert {name: (out / name).read_bytes() for name in pair} == pair
    assert sorted(p.name for p in out.iterdir()) == sorted(pair)  # no .part file left behind


# ---------------------------------------------------------------------------------------- the shipped weights
def test_shipped_weights_load_and_carry_their_metadata():
    folder = release.DEFAULT_WEIGHTS_DIR
    paths = {stage: folder / name for stage, name in release.DEFAULT_WEIGHTS_NAMES.items()}
    assert all(path.is_file() for path in paths.values()), f"the shipped model is missing from {folder}"
    assert sum(path.stat().st_size for path in paths.values()) <= export_script.SIZE_TARGET_BYTES
    names = {1: list(labels.TISSUE_CLASS_NAMES), 2: list(labels.LESION_CLASS_NAMES)}
    for stage, path in paths.items():
        checkpoint = release.load_weights(path, stage)
        assert checkpoint["stage"] == stage and checkpoint["class_names"] == names[stage]
        with safe_open(str(path), framework="pt") as handle:
            dtypes = {handle.get_slice(name).get_dtype() for name in handle.keys()}
        assert "F16" in dtypes and not dtypes & {"F32", "F64", "BF16"}, dtypes
        metadata = checkpoint["metadata"]
        for key in ("training_data", "recipe", "commit"):
            assert metadata.get(key), f"{path.name} records no {key}"
        if stage == 2:
            assert 0 < checkpoint["lesion_threshold"] <= 1
        checkpoints.model_from_checkpoint(checkpoint)


def test_the_shipped_model_finds_fgt_on_a_full_field_image(shared_data, tmp_path, monkeypatch, capsys):
    """The acceptance of issue 12: no weights flag, a 16-bit full-field digital mammogram, an FGT ROI."""
    monkeypatch.delenv(release.WEIGHTS_DIR_ENV, raising=False)
    out = tmp_path / "pred"
    argv = ["--image", str(shared_data / "nyu_16bit" / "images" / "0_R-CC.png"), "--output-dir", str(out),
            "--no-visualization"]
    assert ci.main(ci.get_args_parser().parse_args(argv)) == 0
    assert capsys.readouterr().out.count("using the shipped default model") == 1  # once for both stages
    record = json.loads((out / "0_R-CC.json").read_text(encoding="utf-8"))
    assert record["roi"]["source"] == "fgt" and record["tissue"]["areas_px"]["fgt"] > 0
    assert record["checkpoints"]["stage1"]["path"] == str(release.DEFAULT_WEIGHTS_DIR.joinpath(
        release.DEFAULT_WEIGHTS_NAMES[1]).resolve())
    assert record["lesions"]["threshold"] == release.read_settings(
        release.DEFAULT_WEIGHTS_DIR / release.DEFAULT_WEIGHTS_NAMES[2], 2)["lesion_threshold"]
