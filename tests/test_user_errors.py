"""Inputs that cannot fool the suite (issue 14): table cells normalised in one place, and a user's mistakes as one line.

- Tables (``tables.py``): split cells with stray spaces or capitals are respected, backslash paths train, ``A.PNG``
  finds ``A.png``, an unknown split is one line naming the file, the row, the value and the allowed values.
- Checkpoints of the wrong stage get the advice that fits (``cascade.stage_mismatch``).
- One table-driven test runs every script's ``main(get_args_parser().parse_args([...]))`` with a user's mistake and
  checks: exit code 2, exactly one non-empty stderr line starting with ``error:``, naming the offending file (or
  flag), no traceback.

Everything here is synthetic (``synthetic.make_case`` pictures at 128x64, untrained checkpoints with a 0.57 M
parameter encoder) and fails before any real work, except the one test that must reach an epoch to meet a corrupt
image.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mammo.cli import benchmark
from mammo import cascade
from mammo.cli import infer as cascade_inference
from mammo.cli import train as csm
from mammo.weights import checkpoints
import datasets
from mammo.cli import evaluate
from mammo import imaging
from mammo.cli import onnx_backend
from mammo.cli import prepare as prepare_to_train
from mammo.data import tables
from mammo.training import trainer
from mammo.cascade import checks
from mammo.nn.models import build_model, default_model_config
from mammo.prepare.sources.common import clean_path_field
from mammo.data.synthetic import make_case

ENCODER = "tu-mobilenetv3_small_050"
SCRIPTS = {"prepare_to_train": prepare_to_train, "cascade_segmentation_model": csm, "evaluate": evaluate,
           "onnx_backend": onnx_backend, "cascade_inference": cascade_inference, "benchmark": benchmark}


# ------------------------------------------------------------------------------------------------------ fixtures
def _checkpoint(stage: int, path: Path) -> Path:
    torch.manual_seed(stage)
    config = default_model_config(4 if stage == 1 else 1, encoder_name=ENCODER, encoder_weights=None)
    state = checkpoints.make_checkpoint(stage=stage, model=build_model(config), model_config=config,
                                        preprocess_config=dict(imaging.DEFAULT_PREPROCESS),
                                        input_size=(64, 32) if stage == 1 else (32, 32))
    return checkpoints.save_checkpoint(state, path)


def _write_table(path: Path, rows: list[dict]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Good inputs (images, tables, checkpoints) and the wrong things a user may pass instead."""
    root = tmp_path_factory.mktemp("user_errors")
    f: dict[str, Path] = {"root": root}
    tissue, lesion = root / "tissue", root / "lesion"
    tissue_rows, lesion_rows = [], []
    for i in range(6):
        case = make_case(i, height=128, width=64)
        image, label = tissue / f"{case.name}.png", tissue / f"{case.name}_LI.png"
        imaging.write_png(image, case.image)
        imaging.write_png(label, case.tissue_label)
        split = "train" if i < 4 else "val"
        tissue_rows.append({"image_file_path": str(image), "label_file_path": str(label), "patient_id": "",
                            "source": "synthetic", "split": split})
        lesion_image, mask = lesion / f"{case.name}.png", lesion / f"{case.name}_mask.png"
        imaging.write_png(lesion_image, case.image)
        imaging.write_png(mask, case.lesion_mask)
        lesion_rows.append({"image_file_path": str(lesion_image), "roi_mask_file_path": str(mask), "patient_id": "",
                            "split": split})
    f["tissue_csv"] = _write_table(root / "tissue_dataset.csv", tissue_rows)
    f["lesion_csv"] = _write_table(root / "unified_segmentation_dataset.csv", lesion_rows)
    f["image"] = Path(tissue_rows[0]["image_file_path"])
    f["stage1"] = _checkpoint(1, root / "ck" / "stage1.pth")
    f["stage2"] = _checkpoint(2, root / "ck" / "stage2.pth")
    # the wrong things
    f["notes"] = root / "notes.txt"
    f["notes"].write_text("remember to train stage 1 first\n", encoding="utf-8")
    f["empty"] = root / "empty.pth"
    f["empty"].write_bytes(b"")
    f["empty_csv"] = root / "empty.csv"
    f["empty_csv"].write_bytes(b"")
    f["folder"] = root / "a_folder"
    f["folder"].mkdir()
    f["missing"] = root / "missing_file.pth"
    f["header_only"] = root / "header_only.csv"
    f["header_only"].write_text("image_file_path,label_file_path,split\n", encoding="utf-8")
    f["no_columns"] = _write_table(root / "no_columns.csv",
                                   [{"image": r["image_file_path"], "label": r["label_file_path"]}
                                    for r in tissue_rows])
    f["gone_csv"] = _write_table(root / "gone.csv", [{**r, "image_file_path": str(root / f"gone_{i}.png")}
                                                     for i, r in enumerate(tissue_rows)])
    f["text_image"] = root / "text_image.png"
    f["text_image"].write_text("not a picture", encoding="utf-8")
    f["text_image_csv"] = _write_table(root / "text_image.csv",
                                       [{**tissue_rows[0], "image_file_path": str(f["text_image"])}, *tissue_rows[1:]])
    f["bad_split_csv"] = _write_table(root / "bad_split.csv", [{**r, "split": "tset" if i == 1 else r["split"]}
                                                               for i, r in enumerate(tissue_rows)])
    truncated = root / "truncated.png"
    truncated.write_bytes(f["image"].read_bytes()[:200])  # a PNG header, then nothing
    f["truncated"] = truncated
    f["truncated_csv"] = _write_table(root / "truncated.csv", [{**tissue_rows[0], "image_file_path": str(truncated)},
                                                               *tissue_rows[1:]])
    f["broken_ws"] = root / "broken_workspace"
    f["broken_ws"].mkdir()
    (f["broken_ws"] / "tissue_dataset.csv").write_bytes(bytes(range(256)) * 4)
    return f


def _run(script: str, argv: list[str]) -> int:
    module = SCRIPTS[script]
    return module.main(module.get_args_parser().parse_args([str(a) for a in argv]))


def _one_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


# ------------------------------------------------------------------------------------------------------- tables
@pytest.mark.parametrize("value, kind, expected", [
    (" Train ", "split", "train"), ("VAL\t", "split", "val"), ("test\n", "split", "test"), ("", "split", ""),
    (" ./images\\a.png\n", "path", "images/a.png"), ("-", "path", ""), (float("nan"), "path", ""),
    (" a.png ; ;b\\c.png", "paths", "a.png;b/c.png"), (" left", "laterality", "L"), ("r", "laterality", "R"),
    (" mlo ", "view", "MLO"), ("\u00a0P_00001 ", "text", "P_00001"), (None, "text", ""), (" dm", "upper", "DM"),
])
def test_normalise_cell(value, kind, expected):
    assert tables.normalise_cell(value, kind) == expected


def test_clean_path_field_is_the_shared_normaliser():
    for value in (" Mass-Test_P_1_LEFT_CC_1\\a\\000001.dcm\n", "-", "./x/y.png", "a\tb.png"):
        assert clean_path_field(value) == tables.normalise_cell(value, "path")


def test_unknown_split_names_the_file_row_value_and_allowed_values(files):
    with pytest.raises(tables.TableError) as info:
        datasets.read_tissue_table(files["bad_split_csv"])
    message = str(info.value)
    assert "\n" not in message
    for part in (str(files["bad_split_csv"]), "row 3", "'tset'", "train, val, test", "did you mean 'test'?"):
        assert part in message


def test_trailing_spaces_in_split_cells_keep_the_tables_split(files, tmp_path):
    table = pd.read_csv(files["tissue_csv"], dtype=str, keep_default_na=False)
    table["split"] = ["train ", " Train", "TRAIN\t", "train", "val ", "Val"]
    table.loc[len(table)] = {**table.iloc[0].to_dict(), "split": "test "}  # a test row: never trained on
    csv = _write_table(tmp_path / "spaces.csv", table.to_dict("records"))
    read = datasets.read_tissue_table(csv)
    assert list(read["split"]) == ["train"] * 4 + ["val"] * 2 + ["test"]
    args = csm.get_args_parser().parse_args(["--train-stage1", "--tissue-csv", str(csv)])
    train, val, how = trainer.split_table(read, args)
    assert how == "the table's split column"
    assert list(train["image_file_path"]) == list(read["image_file_path"][:4])
    assert list(val["image_file_path"]) == list(read["image_file_path"][4:6])


def test_backslash_paths_and_extension_case_resolve_to_the_files(files, tmp_path):
    folder = tmp_path / "ws" / "tissue" / "images"
    folder.mkdir(parents=True)
    imaging.write_png(folder / "A.png", imaging.read_image(files["image"]).pixels)
    csv = tmp_path / "ws" / "tissue_dataset.csv"
    csv.write_text("image_file_path,label_file_path,split\n"
                   f'" .\\tissue\\images\\A.PNG ",{files["tissue_csv"].parent / "tissue" / "x_LI.png"}, Val \n',
                   encoding="utf-8")
    read = datasets.read_tissue_table(csv)
    assert read["image_file_path"][0] == str(folder / "A.png")
    assert read["split"][0] == "val"
    assert tables.existing_path(folder / "A.PNG") == folder / "A.png"
    assert tables.existing_path(folder / "B.PNG") == folder / "B.PNG"  # nothing to find: unchanged, reported missing
    imaging.write_png(folder / "A.Png", imaging.read_image(files["image"]).pixels)
    assert tables.existing_path(folder / "A.PNG") == folder / "A.PNG"  # two candidates: ambiguous, not guessed


def test_a_table_with_backslash_paths_and_spaced_splits_trains_on_its_own_split(files, tmp_path, capsys):
    rows = pd.read_csv(files["tissue_csv"], dtype=str, keep_default_na=False).to_dict("records")
    root = files["root"]
    for row, split in zip(rows, ["train ", " Train", "TRAIN", "train\t", "val ", " VAL"]):
        for column in ("image_file_path", "label_file_path"):  # relative to the CSV, as Windows writes them
            row[column] = " .\\" + os.path.relpath(row[column], root).replace("/", "\\") + " "
        row["split"] = split
    rows.append({**rows[0], "split": "test "})  # never trained on
    csv = _write_table(root / "windows_table.csv", rows)
    assert _run("cascade_segmentation_model", ["--train-stage1", "--tissue-csv", csv, *_small_training(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "4 training / 2 validation images (the table's split column)" in printed
    assert (tmp_path / "ck1" / "best_stage1.pth").is_file()


def test_a_spreadsheet_table_reads_like_its_csv(files, tmp_path):
    table = pd.read_csv(files["tissue_csv"], dtype=str, keep_default_na=False)
    table.columns = [" Image File Path", "label_file_path ", "Patient_ID", "source", "Split"]
    table["Split"] = [" Train"] * 4 + ["VAL "] * 2
    table.to_excel(tmp_path / "tissue_dataset.xlsx", index=False)
    read = datasets.read_tissue_table(tmp_path / "tissue_dataset.xlsx")
    expected = datasets.read_tissue_table(files["tissue_csv"])
    pd.testing.assert_frame_equal(read, expected)


def test_split_column_with_empty_rows_beside_train_and_val_is_refused(files):
    table = datasets.read_tissue_table(files["tissue_csv"])
    table.loc[3, "split"] = ""
    args = csm.get_args_parser().parse_args(["--train-stage1", "--tissue-csv", str(files["tissue_csv"])])
    with pytest.raises(trainer.TrainingInputError, match="leaves 1 row"):
        trainer.split_table(table, args)
    args.val_fraction = 0.3  # an explicit re-split uses every row
    train, val, how = trainer.split_table(table, args)
    assert len(train) + len(val) == 6 and "patient-level split" in how


def test_data_error_of_a_loader_worker_is_one_line():
    text = ("Caught ImageReadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nimaging.ImageReadError: cannot read image \'/d/a.png\': truncated file')
    assert trainer._data_error(RuntimeError(text)) == "cannot read image '/d/a.png': truncated file"
    assert trainer._data_error(RuntimeError("CUDA out of memory")) is None  # not a data file: a real error


# ------------------------------------------------------------------------------------------------- stage advice
def test_stage_mismatch_advice_fits_the_case():
    swap = cascade.stage_mismatch(2, 1, "a.pth", "b.pth")
    assert "swap --stage1-weights and --stage2-weights" in swap and "a.pth" in swap and "b.pth" in swap
    both1 = cascade.stage_mismatch(1, 1, "a.pth", "b.pth")
    assert "both" in both1 and "stage-1 checkpoints" in both1
    assert "pass a stage-2 checkpoint as --stage2-weights" in both1
    assert "swap" not in both1
    both2 = cascade.stage_mismatch(2, 2)
    assert "pass a stage-1 checkpoint as --stage1-weights" in both2 and "swap" not in both2
    alone = cascade.stage_mismatch(2, None, "a.pth")
    assert "holds stage 2" in alone and "a.pth" in alone and "swap" not in alone
    assert "neither 1 nor 2" in cascade.stage_mismatch(1, 0)
    assert cascade.stage_mismatch(1, 2) is None and cascade.stage_mismatch(1, None) is None


def test_cascade_inference_gives_the_advice_that_fits(files, tmp_path, capsys):
    base = ["--image", files["image"], "--output-dir", tmp_path / "out", "--device", "cpu", "--backend", "torch"]
    two_stage1 = ["--stage1-weights", files["stage1"], "--stage2-weights", files["stage1"], *base]
    assert _run("cascade_inference", two_stage1) == 2
    line = _one_line(capsys)
    assert "both checkpoints given are stage-1 checkpoints" in line and "--stage2-weights" in line
    assert "swap" not in line
    swapped = ["--stage1-weights", files["stage2"], "--stage2-weights", files["stage1"], *base]
    assert _run("cascade_inference", swapped) == 2
    assert "swap --stage1-weights and --stage2-weights" in _one_line(capsys)


# ------------------------------------------------------------------------------------------- one line per mistake
def _small_training(out: Path) -> list[str]:
    return ["--img-size-stage1", "64", "--img-size-stage2", "32", "--batch-size-stage1", "2",
            "--batch-size-stage2", "2", "--epochs-stage1", "1", "--epochs-stage2", "1", "--max-batches-per-epoch", "2",
            "--num-workers", "0",
            "--encoder", ENCODER, "--encoder-weights", "none", "--device", "cpu",
            "--stage1-checkpoint-dir", out / "ck1", "--stage2-checkpoint-dir", out / "ck2", "--logdir", out / "runs"]


#: The file a message must name when a table names a bad file (else the key itself).
_OFFENDING = {"text_image_csv": "text_image"}


def _wrong_files(script: str, flag: str, keys: str, build) -> list[tuple]:
    """One case per wrong file in ``keys`` (space-separated keys of the ``files`` fixture) given to ``flag``;
    ``build(key, files, out)`` makes the argv."""
    return [(script, f"{flag} given {key}", functools.partial(build, key), _OFFENDING.get(key, key))
            for key in keys.split()]


def _evaluate_truth(key, f, o):
    return ["--tissue-csv", f[key], "--predictions-dir", f["folder"]]


def _evaluate_weights(key, f, o):
    return ["--tissue-csv", f["tissue_csv"], "--stage1-weights", f[key]]


def _train_stage1_on(key, f, o):
    return ["--train-stage1", "--tissue-csv", f[key]]


def _crops_by(key, f, o):
    return ["--train-stage2", "--cancer-csv", f["lesion_csv"], "--stage1-checkpoint", f[key]]


def _pair(first, second):
    return lambda f, o: ["--stage1-weights", f[first], "--stage2-weights", f[second]]


def _tissue_training(*extra):
    """Stage-1 training on the good table with ``extra`` flags (a key of ``files`` stands for that file)."""
    return lambda f, o: ["--train-stage1", "--tissue-csv", f["tissue_csv"], *(f.get(e, e) for e in extra)]


#: (script, case name, argv builder (files, out) -> argv, what the line must name: a key of ``files``, or a flag or
#: value given)
MISTAKES = [
    # prepare.py
    *_wrong_files("prepare_to_train", "--tissue-dir", "missing notes folder", lambda k, f, o: ["--tissue-dir", f[k]]),
    ("prepare_to_train", "lesion-dir without images/ masks/", lambda f, o: ["--lesion-dir", f["folder"]], "folder"),
    ("prepare_to_train", "mini-ddsm-dir without a table", lambda f, o: ["--mini-ddsm-dir", f["folder"]], "folder"),
    ("prepare_to_train", "cbis-dir without a CSV", lambda f, o: ["--cbis-dir", f["folder"]], "folder"),
    ("prepare_to_train", "tissue-zip is a text file", lambda f, o: ["--tissue-zip", f["notes"]], "notes"),
    ("prepare_to_train", "cbis-zip is a folder", lambda f, o: ["--cbis-zip", f["folder"]], "folder"),
    *_wrong_files("prepare_to_train", "--cbis-csv", "notes empty_csv image",
                  lambda k, f, o: ["--cbis-dir", f["folder"], "--cbis-csv", f[k]]),
    ("prepare_to_train", "workspace is a file", lambda f, o: ["--synthetic", "2", "--workspace", f["notes"]], "notes"),
    ("prepare_to_train", "archive is a folder", lambda f, o: ["--synthetic", "2", "--archive", f["folder"]], "folder"),
    ("prepare_to_train", "negative tolerance",
     lambda f, o: ["--synthetic", "2", "--mask-aspect-tolerance", "-1"], "--mask-aspect-tolerance"),
    ("prepare_to_train", "negative count", lambda f, o: ["--synthetic", "-2"], "--synthetic"),
    ("prepare_to_train", "cbis-csv without its image folder", lambda f, o: ["--cbis-csv", f["notes"]], "notes"),
    # cascade_segmentation_model.py
    *_wrong_files("cascade_segmentation_model", "--stage1-checkpoint", "notes image folder missing empty stage2",
                  _crops_by),
    ("cascade_segmentation_model", "train-both: bad cancer-csv found before stage 1 trains",
     lambda f, o: ["--train-both", "--tissue-csv", f["tissue_csv"], "--cancer-csv", f["no_columns"]], "no_columns"),
    *_wrong_files("cascade_segmentation_model", "--tissue-csv",
                  "missing folder empty_csv header_only no_columns gone_csv text_image_csv bad_split_csv image",
                  _train_stage1_on),
    *_wrong_files("cascade_segmentation_model", "--tissue-data-dir", "notes folder broken_ws",
                  lambda k, f, o: ["--train-stage1", "--tissue-data-dir", f[k]]),
    ("cascade_segmentation_model", "encoder-weights is a text file",
     _tissue_training("--encoder-weights", "notes"), "notes"),
    ("cascade_segmentation_model", "checkpoint dir is a file",
     _tissue_training("--stage1-checkpoint-dir", "notes"), "notes"),
    ("cascade_segmentation_model", "negative learning rate", _tissue_training("--lr-stage1", "-1"), "--lr-stage1"),
    ("cascade_segmentation_model", "validation fraction above 1", _tissue_training("--val-fraction", "1.5"),
     "--val-fraction"),
    ("cascade_segmentation_model", "one fold", _tissue_training("--folds", "1", "--fold", "0"), "--folds"),
    ("cascade_segmentation_model", "unknown encoder", _tissue_training("--encoder", "resnet999"), "resnet999"),
    # evaluate.py
    *_wrong_files("evaluate", "--tissue-csv",
                  "missing folder empty_csv no_columns gone_csv text_image_csv bad_split_csv", _evaluate_truth),
    *_wrong_files("evaluate", "--stage1-weights", "notes image folder empty", _evaluate_weights),
    ("evaluate", "tissue-dir is a file", lambda f, o: ["--tissue-dir", f["notes"], "--predictions-dir", f["folder"]],
     "notes"),
    ("evaluate", "lesion-dir is a file", lambda f, o: ["--lesion-dir", f["notes"], "--predictions-dir", f["folder"]],
     "notes"),
    ("evaluate", "predictions-dir is a file",
     lambda f, o: ["--tissue-csv", f["tissue_csv"], "--predictions-dir", f["notes"]], "notes"),
    ("evaluate", "two stage-1 checkpoints",
     lambda f, o: ["--lesion-csv", f["lesion_csv"], *_pair("stage1", "stage1")(f, o)], "stage1"),
    ("evaluate", "swapped checkpoints",
     lambda f, o: ["--lesion-csv", f["lesion_csv"], *_pair("stage2", "stage1")(f, o)], "stage2"),
    ("evaluate", "output-dir is a file",
     lambda f, o: [*_evaluate_truth("tissue_csv", f, o), "--output-dir", f["notes"]], "notes"),
    ("evaluate", "export-onnx is a file",
     lambda f, o: ["--stage1-weights", f["stage1"], "--export-onnx", f["notes"]], "notes"),
    ("evaluate", "unknown split", lambda f, o: [*_evaluate_truth("tissue_csv", f, o), "--split", "tset"], "--split"),
    ("evaluate", "limit 0", lambda f, o: [*_evaluate_truth("tissue_csv", f, o), "--limit", "0"], "--limit"),
    # onnx_backend.py
    *_wrong_files("onnx_backend", "--stage1-weights", "notes folder image missing stage2",
                  lambda k, f, o: ["--stage1-weights", f[k]]),
    ("onnx_backend", "stage2-weights is empty", lambda f, o: ["--stage2-weights", f["empty"]], "empty"),
    ("onnx_backend", "two stage-1 checkpoints", _pair("stage1", "stage1"), "stage1"),
    ("onnx_backend", "swapped checkpoints", _pair("stage2", "stage1"), "stage2"),
    ("onnx_backend", "output-dir is a file", lambda f, o: ["--stage1-weights", f["stage1"], "--output-dir", f["notes"]],
     "notes"),
    ("onnx_backend", "opset out of range", lambda f, o: ["--stage1-weights", f["stage1"], "--opset", "5"], "--opset"),
    # infer.py and benchmark.py (not changed here: their one-line errors guarded)
    ("cascade_inference", "stage1-weights is a text file",
     lambda f, o: [*_pair("notes", "stage2")(f, o), "--image", f["image"]], "notes"),
    ("cascade_inference", "stage1-weights missing",
     lambda f, o: [*_pair("missing", "stage2")(f, o), "--image", f["image"]], "missing"),
    ("cascade_inference", "image-dir is a file",
     lambda f, o: ["--checkpoint-dir", f["folder"], "--image-dir", f["notes"]], "notes"),
    ("cascade_inference", "output-dir is a file",
     lambda f, o: ["--checkpoint-dir", f["folder"], "--image", f["image"], "--output-dir", f["notes"]], "notes"),
    ("cascade_inference", "checkpoint-dir without checkpoints",
     lambda f, o: ["--checkpoint-dir", f["folder"], "--image", f["image"]], "folder"),
    ("cascade_inference", "image is a text file",
     lambda f, o: [*_pair("stage1", "stage2")(f, o), "--image", f["notes"]], "notes"),
    ("cascade_inference", "checkpoint-dir does not exist",
     lambda f, o: ["--checkpoint-dir", f["missing"], "--image", f["image"]], "missing"),
    ("cascade_inference", "checkpoint-dir is a file",
     lambda f, o: ["--checkpoint-dir", f["notes"], "--image", f["image"]], "notes"),
    ("cascade_inference", "stage1-weights is a folder",
     lambda f, o: [*_pair("folder", "stage2")(f, o), "--image", f["image"]], "folder"),
    ("benchmark", "output is a folder",
     lambda f, o: ["--quick", "--output", f["folder"]], "folder"),
    ("benchmark", "image is a text file",
     lambda f, o: ["--quick", "--image", f["notes"], "--output", o / "b.json"], "notes"),
    ("benchmark", "stage1-weights holds stage 2",
     lambda f, o: ["--quick", "--stage1-weights", f["stage2"], "--output", o / "b.json"], "stage2"),
    ("benchmark", "stage1-weights is a text file",
     lambda f, o: ["--quick", "--stage1-weights", f["notes"], "--output", o / "b.json"], "notes"),
    ("benchmark", "image missing",
     lambda f, o: ["--quick", "--image", f["missing"], "--output", o / "b.json"], "missing"),
    # an output below a regular file (issue 21; CI runs as root, so never chmod): one line before any work
    ("benchmark", "output below a file", lambda f, o: ["--quick", "--output", f["notes"] / "b.json"], "notes"),
    ("evaluate", "output-dir below a file",
     lambda f, o: [*_evaluate_truth("tissue_csv", f, o), "--output-dir", f["notes"] / "eval"], "notes"),
    ("evaluate", "export-onnx below a file",
     lambda f, o: ["--stage1-weights", f["stage1"], "--export-onnx", f["notes"] / "onnx"], "notes"),
    ("cascade_segmentation_model", "logdir below a file",
     lambda f, o: ["--train-stage1", "--tissue-csv", f["tissue_csv"], "--logdir", f["notes"] / "runs"], "notes"),
    ("onnx_backend", "output-dir below a file",
     lambda f, o: ["--stage1-weights", f["stage1"], "--output-dir", f["notes"] / "onnx"], "notes"),
    ("prepare_to_train", "workspace below a file",
     lambda f, o: ["--synthetic", "2", "--workspace", f["notes"] / "ws"], "notes"),
]

#: Flags each script needs for a run to reach the check (an output folder under the test's tmp_path).
_DEFAULTS = {
    "prepare_to_train": lambda o: ["--workspace", o / "ws"],
    "cascade_segmentation_model": _small_training,
    "evaluate": lambda o: ["--output-dir", o / "eval", "--backend", "torch"],
    "onnx_backend": lambda o: ["--output-dir", o / "onnx"],
    "cascade_inference": lambda o: ["--output-dir", o / "pred", "--device", "cpu", "--backend", "torch"],
    "benchmark": lambda o: ["--threads", "1"],
}


@pytest.mark.parametrize("script, case, argv, offending", MISTAKES, ids=[f"{m[0]}: {m[1]}" for m in MISTAKES])
def test_a_users_mistake_is_one_line_naming_the_file(script, case, argv, offending, files, tmp_path, capsys):
    given = [str(a) for a in argv(files, tmp_path)]
    defaults = [str(a) for a in _DEFAULTS[script](tmp_path)]
    flags = set(given)
    for i in range(0, len(defaults)):  # a flag given by the case replaces the default
        if defaults[i] in flags and defaults[i].startswith("--"):
            defaults[i] = defaults[i + 1] = ""
    assert _run(script, given + [d for d in defaults if d]) == 2
    line = _one_line(capsys)
    name = files[offending].name if offending in files else offending
    assert name in line, line
    assert not (tmp_path / "ws" / "tissue_dataset.csv").exists() and not (tmp_path / "ck1").exists()


def test_corrupt_image_met_in_an_epoch_is_one_line(files, tmp_path, capsys):
    argv = ["--train-stage1", "--tissue-csv", files["truncated_csv"], *_small_training(tmp_path)]
    assert _run("cascade_segmentation_model", argv) == 2
    line = _one_line(capsys)
    assert "truncated.png" in line and "epoch 1" in line and "truncated.csv" in line


def test_numbers_and_describe(tmp_path):
    with pytest.raises(checks.UserInputError, match=r"--x must be in \(0, 1\), got nan"):
        checks.number(float("nan"), "--x", 0, 1, low_open=True, high_open=True)
    checks.number(None, "--x", 1)
    (tmp_path / "t.txt").write_text("x")
    imaging.write_png(tmp_path / "i.png", np.zeros((4, 4), np.uint8))
    assert checks.describe(tmp_path / "t.txt") == "a text file"
    assert checks.describe(tmp_path / "i.png") == "a PNG image"
    assert checks.describe(tmp_path) == "a folder"
    assert checks.describe(tmp_path / "none") == "missing"
    assert checks.one_line("a\n\n  b \n") == "a b"
    # safetensors is told by its header (length 2, then "{}"), not by its name; a text file named so stays text
    (tmp_path / "m.bin").write_bytes((2).to_bytes(8, "little") + b"{}")
    (tmp_path / "t.safetensors").write_text("not a model\n")
    (tmp_path / "long.bin").write_bytes((50).to_bytes(8, "little") + b"{}")  # a header longer than the file
    assert checks.describe(tmp_path / "m.bin") == "a safetensors model file"
    assert checks.describe(tmp_path / "t.safetensors") == "a text file"
    assert checks.describe(tmp_path / "long.bin") == "a binary file"
    assert os.path.basename(str(checks.output_folder(tmp_path / "new" / "deeper", "--o"))) == "deeper"


@pytest.mark.parametrize("script, argv, expected", [
    ("cascade_inference", ["--image", "x.png", "--threshold", "1.5"],
     "argument --threshold: threshold must be in (0, 1)"),
    ("cascade_inference", ["--image", "x.png", "--device", "gpu"], "argument --device: device must be auto"),
    ("evaluate", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    # one range for the lesion settings of every script (issue 18): a threshold in (0, 1), an area >= 1 px
    ("cascade_inference", ["--image", "x.png", "--threshold", "1"],
     "argument --threshold: threshold must be in (0, 1)"),
    ("evaluate", ["--threshold", "1"], "argument --threshold: threshold must be in (0, 1)"),
    ("evaluate", ["--min-lesion-area", "0"], "argument --min-lesion-area: must be a positive integer, got 0"),
    ("cascade_inference", ["--min-lesion-area", "0"], "argument --min-lesion-area: must be a positive integer, got 0"),
    ("prepare_to_train", ["--synthetic", "many"], "argument --synthetic: invalid"),
    ("cascade_segmentation_model", [], "one of the arguments --train-stage1 --train-stage2 --train-both is required"),
    ("benchmark", ["--repeats", "3.5"], "argument --repeats: invalid int value: '3.5'"),
    ("onnx_backend", [], "the following arguments are required: --output-dir"),
])
def test_argument_mistakes_are_one_line(script, argv, expected, capsys):
    """argparse's own errors (bad value, unknown flag, missing flag) are one line with exit code 2, not the usage
    block followed by the error."""
    module = SCRIPTS[script]
    with pytest.raises(SystemExit) as excinfo:
        module.get_args_parser().parse_args(argv)
    assert excinfo.value.code == 2
    line = _one_line(capsys)
    assert expected in line and line.endswith("--help)"), line



# -------------------------------------------------------------------------------- errors before work (issue 21)
def _csaw_folder(root: Path, patients=("000", "002")) -> Path:
    """A CSAW-S layout: ``images/<patient>_<view>.png`` and an (empty) ``masks/``; the hold-out check reads names."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for patient in patients:
        for view in (0, 1):
            imaging.write_png(root / "images" / f"{patient}_{view}.png", np.zeros((8, 4), np.uint8))
    return root


def test_a_csaw_holdout_patient_that_does_not_exist_is_one_line(tmp_path, capsys):
    """``--csaw-holdout 2`` (meant ``002``) would train on patient 002: refused before anything is written."""
    csaw = _csaw_folder(tmp_path / "csaw")
    argv = ["--csaw-dir", csaw, "--csaw-holdout", "2", "--workspace", tmp_path / "ws"]
    assert _run("prepare_to_train", argv) == 2
    line = _one_line(capsys)
    for part in ("--csaw-holdout 2:", "'2'", "patients found: 000, 002", "did you mean 002?", "'none'"):
        assert part in line, line
    assert not (tmp_path / "ws").exists()


def test_the_default_csaw_holdout_must_exist_too_and_good_ids_pass(tmp_path, capsys):
    csaw = _csaw_folder(tmp_path / "csaw", patients=("000", "001"))
    assert _run("prepare_to_train", ["--csaw-dir", csaw, "--workspace", tmp_path / "ws"]) == 2
    line = _one_line(capsys)
    assert "--csaw-holdout 002 (the default): no CSAW-S patient '002'" in line and "001" in line
    assert "did you mean" not in line
    assert not (tmp_path / "ws").exists()
    parse = prepare_to_train.get_args_parser().parse_args
    for ids in ("001", "000,001", "none", "NONE"):
        assert prepare_to_train._usage_problem(parse(["--csaw-dir", str(csaw), "--csaw-holdout", ids,
                                                      "--workspace", str(tmp_path / "ws")])) is None


def _cbis_zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("CBIS-DDSM/csv/mass_case_description_test_set.csv", "image file path\nx.dcm\n")
        archive.writestr("CBIS-DDSM/csv/calc_case_description_test_set.csv", "image file path\ny.dcm\n")
    return path


def test_a_cbis_csv_not_here_nor_in_the_zip_is_one_line(tmp_path, capsys):
    """With a zip only, a ``--cbis-csv`` name was dropped silently and every CSV of the zip used instead."""
    zipped = _cbis_zip(tmp_path / "CBIS-DDSM.zip")
    argv = ["--cbis-zip", zipped, "--cbis-csv", "mass_case_description_train_set.csv", "--workspace", tmp_path / "ws"]
    assert _run("prepare_to_train", argv) == 2
    line = _one_line(capsys)
    assert "--cbis-csv mass_case_description_train_set.csv" in line and "CBIS-DDSM.zip" in line
    assert not (tmp_path / "ws").exists()
    # a --zips-dir without a CBIS-DDSM zip: refused before any zip is extracted
    zips = tmp_path / "zips"
    zips.mkdir()
    with zipfile.ZipFile(zips / "Mammogram-segmentation-master.zip", "w") as archive:
        archive.writestr("README.md", "tissue labels")
    argv = ["--zips-dir", zips, "--cbis-csv", "mass.csv", "--workspace", tmp_path / "ws"]
    assert _run("prepare_to_train", argv) == 2
    assert "needs --cbis-dir" in _one_line(capsys)
    assert not (tmp_path / "ws").exists()


def test_a_cbis_csv_named_inside_the_zip_is_the_one_used(tmp_path):
    zipped = _cbis_zip(tmp_path / "CBIS-DDSM.zip")
    parse = prepare_to_train.get_args_parser().parse_args
    args = parse(["--cbis-zip", str(zipped), "--cbis-csv", "calc_case_description_test_set.csv",
                  "--workspace", str(tmp_path / "ws")])
    assert prepare_to_train._usage_problem(args) is None
    extracted = tmp_path / "extracted"
    with zipfile.ZipFile(zipped) as archive:
        archive.extractall(extracted)
    found = prepare_to_train._cbis_csvs_for(extracted, args.cbis_csv)
    assert [p.name for p in found] == ["calc_case_description_test_set.csv"]


def _interrupt(*_, **__):
    raise KeyboardInterrupt


#: (script, the function of its module that Ctrl-C interrupts, argv builder, what the line says to do next)
_INTERRUPTED = [
    ("prepare_to_train", "process_samples", lambda f, o: ["--synthetic", "2", "--workspace", o / "ws"],
     "images finished so far are kept in the workspace"),
    ("cascade_segmentation_model", "train_stage",
     lambda f, o: ["--train-stage1", "--tissue-csv", f["tissue_csv"], *_small_training(o)], "with --resume"),
    ("evaluate", "_run_tasks", lambda f, o: [*_evaluate_truth("tissue_csv", f, o), "--output-dir", o / "eval"],
     "run it again"),
    ("onnx_backend", "export_stages", lambda f, o: ["--stage1-weights", f["stage1"], "--output-dir", o / "onnx"],
     "--overwrite"),
    ("benchmark", "_usage_problem", lambda f, o: ["--quick", "--output", o / "b.json"], "nothing was written"),
    ("cascade_inference", "_load_and_run", lambda f, o: ["--image", f["image"], "--stage1-weights", f["stage1"],
                                                          "--stage2-weights", f["stage2"], "--output-dir", o / "pred"],
     "finished images are kept"),
]


@pytest.mark.parametrize("script, target, argv, advice", _INTERRUPTED, ids=[c[0] for c in _INTERRUPTED])
def test_ctrl_c_is_one_line_and_exit_status_130(script, target, argv, advice, files, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(SCRIPTS[script], target, _interrupt)
    assert _run(script, argv(files, tmp_path)) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted: {script}.py stopped; "), lines
    assert advice in lines[0]


def test_ctrl_c_keeps_main_callable_without_arguments(tmp_path, monkeypatch, capsys):
    """The entry points (pyproject.toml) call ``main()``: the arguments come from ``sys.argv``."""
    monkeypatch.setattr(sys, "argv", ["mammo-prepare", "--synthetic", "2", "--workspace", str(tmp_path / "ws")])
    monkeypatch.setattr(prepare_to_train, "process_samples", _interrupt)
    assert prepare_to_train.main() == 130
    assert prepare_to_train.main.__name__ == "main" and "Build the workspace" in prepare_to_train.main.__doc__
    assert capsys.readouterr().err.startswith("interrupted: prepare_to_train.py stopped;")


def _unwritable(tmp_path) -> Path:
    """A folder that cannot be written even by root (CI runs as root: ``chmod`` does not stop it): one below
    ``/sys`` (Linux: sysfs refuses new files); skips where that is not so."""
    if not Path("/sys").is_dir():
        pytest.skip("no /sys here: no folder that refuses writes for every user")
    try:
        handle, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        return Path("/sys") / f"mammo_test_{tmp_path.name}"
    os.close(handle)
    os.unlink(probe)
    pytest.skip("/sys accepts new files here")


def _no_work(*_, **__):
    raise AssertionError("work started before the output folder was checked")


#: (script, argv builder (files, out, unwritable folder), flag named, function of the module that must not run)
_UNWRITABLE = [
    ("evaluate", lambda f, o, u: [*_evaluate_truth("tissue_csv", f, o), "--output-dir", u], "--output-dir",
     "_build_predictor"),
    ("cascade_segmentation_model",
     lambda f, o, u: ["--train-stage1", "--tissue-csv", f["tissue_csv"], *_small_training(o),
                      "--stage1-checkpoint-dir", u], "--stage1-checkpoint-dir", "train_stage"),
    ("cascade_segmentation_model",
     lambda f, o, u: ["--train-stage1", "--tissue-csv", f["tissue_csv"], *_small_training(o), "--logdir", u / "runs"],
     "--logdir", "train_stage"),
    ("prepare_to_train", lambda f, o, u: ["--synthetic", "2", "--workspace", u], "--workspace", "process_samples"),
    ("onnx_backend", lambda f, o, u: ["--stage1-weights", f["stage1"], "--output-dir", u], "--output-dir",
     "export_stages"),
]


@pytest.mark.parametrize("script, argv, flag, work", _UNWRITABLE, ids=[f"{c[0]} {c[2]}" for c in _UNWRITABLE])
def test_an_output_folder_that_cannot_be_written_is_one_line_before_work(script, argv, flag, work, files, tmp_path,
                                                                        monkeypatch, capsys):
    folder = _unwritable(tmp_path)
    monkeypatch.setattr(SCRIPTS[script], work, _no_work)
    given = [str(a) for a in argv(files, tmp_path, folder)]
    last = {a: i for i, a in enumerate(given)}  # a flag given twice: argparse keeps the last
    assert _run(script, given) == 2
    line = _one_line(capsys)
    assert f"{flag} {given[last[flag] + 1]} cannot be written" in line and "choose a folder" in line, line


def test_writable_folder_creates_and_leaves_nothing(files, tmp_path):
    target = tmp_path / "new" / "deeper"
    assert checks.writable_folder(target, "--o") == target
    assert list(tmp_path.iterdir()) == []  # the probe was made in tmp_path and removed; nothing created
    with pytest.raises(checks.UserInputError, match="its parent .*notes.txt is a file"):
        checks.writable_folder(files["notes"] / "out", "--o")


_ROOT = Path(__file__).resolve().parents[1]


def _bash(script: str, *argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(_ROOT / script), *argv], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env}, cwd=_ROOT)


def test_evaluate_domains_without_arguments_prints_its_usage():
    done = _bash("scripts/evaluate_domains.sh")
    assert done.returncode == 2
    assert "unbound" not in done.stderr and done.stdout == ""
    assert done.stderr.startswith("error: STAGE1, STAGE2 and OUTPUT_DIR are required")
    assert "usage: bash scripts/evaluate_domains.sh STAGE1 STAGE2 OUTPUT_DIR" in done.stderr
    assert len(done.stderr.splitlines()) <= 8
    helped = _bash("scripts/evaluate_domains.sh", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: ")


def test_evaluate_domains_optional_arguments_stop_at_the_first_flag():
    done = _bash("scripts/evaluate_domains.sh", "s1.pth", "s2.pth", "out", "--limit", "2", PYTHON="echo")
    assert done.returncode == 0, done.stderr
    first = done.stdout.splitlines()[0]
    assert "--tissue-csv workspace_v2/tissue_dataset.csv" in first and "--csaw-patients 002" in first
    assert first.endswith("--limit 2")


def test_train_sh_help_and_setup_env_arguments():
    helped = _bash("train.sh", "--help", PYTHON="false")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: bash train.sh")
    missing = _bash("train.sh", WORKSPACE=str(_ROOT / "no_such_workspace"), PYTHON="false")
    assert missing.returncode == 2 and "no_such_workspace/tissue_dataset.csv not found" in missing.stderr
    bad = _bash("scripts/setup_env.sh", "--venv", "x", PYTHON="false", MAMMO_VENV=str(_ROOT / "no_such_venv"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: setup_env.sh takes no arguments")
    assert "usage: bash scripts/setup_env.sh" in bad.stderr and not (_ROOT / "no_such_venv").exists()
