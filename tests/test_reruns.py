"""Reruns that cannot mix results (issue 21, item 3), broken links and an unwritable output folder (item 5).

Each record of ``cascade_inference.py`` says what made it (``provenance``: the input file's size, time and SHA-256,
and the settings that change the outputs; the weights are its ``checkpoints``). A rerun into the same output folder
skips an input only when its record came from the same file with the same weights and settings; anything else is a
``conflict``: its outputs are not touched, the reason names the difference and ``--overwrite``, and the exit status
is 1. One run at a time per output folder (a lock file, taken over when its process is dead); a broken link in the
input folder is a failed input; an output folder that cannot be written is one line, exit 2, before any model loads.

Real images from ``../shared/data`` (the ``tissue_dir`` fixture) and the untrained checkpoints of ``checkpoint_dir``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mammo.cascade import load
from mammo.cli import infer as ci
from mammo.inference import folder_lock, listing
from mammo.inference.record import validate_record

NAMES = ("A_0002_1.RIGHT_MLO.png", "A_0003_1.RIGHT_MLO.png")


def _args(checkpoint_dir: Path, *extra: str):
    return ci.get_args_parser().parse_args(["--checkpoint-dir", str(checkpoint_dir), "--device", "cpu", "--backend",
                                            "torch", "--no-visualization", *extra])


def _folder(tissue_dir: Path, where: Path, names=NAMES, as_name: str | None = None) -> Path:
    """A folder holding copies of real tissue images (under ``as_name`` when given: one file)."""
    where.mkdir(parents=True)
    for name in names:
        shutil.copyfile(tissue_dir / "fgt_seg" / name, where / (as_name or name))
    return where


def _rows(path: Path) -> dict:
    with path.open(encoding="utf-8", newline="") as stream:
        return {row["input"]: row for row in csv.DictReader(stream)}


def _newest(out: Path, stem: str) -> Path:
    """The newest ``predictions*.csv`` / ``summary*.json`` (a rerun writes a timestamped one beside the first)."""
    suffix = ".csv" if stem == "predictions" else ".json"
    return max(out.glob(f"{stem}*{suffix}"), key=lambda p: p.stat().st_mtime_ns)


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
            if p.is_file() and not p.name.startswith(("predictions", "summary"))}


@pytest.fixture
def no_model(monkeypatch):
    """Loading a cascade fails the test: the check under test must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(load, "load_cascade", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------------------------------- provenance
def test_records_say_what_made_them_and_older_records_still_validate(checkpoint_dir, tissue_dir, tmp_path):
    inputs, out = _folder(tissue_dir, tmp_path / "in", NAMES[:1]), tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 0
    record = json.loads((out / f"{Path(NAMES[0]).stem}.json").read_text(encoding="utf-8"))
    source = inputs / NAMES[0]
    made = record["provenance"]
    assert made["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert made["input"]["size_bytes"] == source.stat().st_size and made["input"]["modified_utc"].endswith("+00:00")
    assert made["settings"] == {"lesion_threshold": 0.5, "min_lesion_area_px": 1, "tta": False,
                                "adaptive_clahe": "off", "anatomy": True, "prob_encoding": "uint8"}
    assert validate_record(record) == []
    older = {k: v for k, v in record.items() if k != "provenance"}
    assert validate_record(older) == []  # a record written before provenance is still a valid record
    broken = json.loads(json.dumps(record))
    del broken["provenance"]["input"]["sha256"]
    assert any("provenance.input.sha256: missing" in p for p in validate_record(broken))
    row = _rows(out / "predictions.csv")[NAMES[0]]
    assert row["input_sha256"] == made["input"]["sha256"]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["settings"] == made["settings"] and summary["conflicts"] == []
    assert not (out / folder_lock.LOCK_NAME).exists()  # the lock is gone after the run


# ------------------------------------------------------------------------------------------------------ reruns
def test_rerun_with_the_same_file_weights_and_settings_skips(checkpoint_dir, tissue_dir, tmp_path, capsys):
    inputs, out = _folder(tissue_dir, tmp_path / "in"), tmp_path / "out"
    argv = ["--image-dir", str(inputs), "--output-dir", str(out), "--threshold", "0.4"]
    assert ci.main(_args(checkpoint_dir, *argv)) == 0
    before = _digest(out)
    capsys.readouterr()
    assert ci.main(_args(checkpoint_dir, *argv)) == 0
    assert capsys.readouterr().out.count("outputs exist, skipped") == 2
    assert _digest(out) == before
    rows = _rows(_newest(out, "predictions"))
    assert {row["status"] for row in rows.values()} == {"exists"} and all(r["percent_density"] for r in rows.values())
    summary = json.loads(_newest(out, "summary").read_text(encoding="utf-8"))
    assert summary["counts"] == {"exists": 2} and summary["records_summarised"] == {"made_now": 0, "kept": 2}
    assert sum(summary["density_categories"].values()) == 2 and summary["settings"]["lesion_threshold"] == 0.4


def test_rerun_with_another_threshold_touches_nothing_and_names_the_difference(checkpoint_dir, tissue_dir, tmp_path,
                                                                               capsys):
    inputs, out = _folder(tissue_dir, tmp_path / "in"), tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 0
    before = _digest(out)
    capsys.readouterr()
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out),
                         "--threshold", "0.3")) == 1
    captured = capsys.readouterr()
    assert "outputs exist, skipped" not in captured.out and "NOT TOUCHED" in captured.err
    assert _digest(out) == before  # no record, map or figure of the first run changed
    rows = _rows(_newest(out, "predictions"))
    for name in NAMES:
        row = rows[name]
        assert row["status"] == "conflict" and row["percent_density"] == ""  # the old values are not reported
        assert "--threshold" in row["reason"] and "0.5" in row["reason"] and "this run: 0.3" in row["reason"]
        assert "--overwrite" in row["reason"] and row["json"] == f"{Path(name).stem}.json"
    summary = json.loads(_newest(out, "summary").read_text(encoding="utf-8"))
    assert summary["counts"] == {"conflict": 2} and summary["density_percent"] is None
    assert [entry["input"] for entry in summary["conflicts"]] == list(NAMES)
    assert summary["records_summarised"] == {"made_now": 0, "kept": 0} and summary["lesion_threshold"] == 0.3
    # --overwrite redoes them with the new threshold
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out), "--threshold", "0.3",
                         "--overwrite")) == 0
    record = json.loads((out / f"{Path(NAMES[0]).stem}.json").read_text(encoding="utf-8"))
    assert record["lesions"]["threshold"] == 0.3 and record["provenance"]["settings"]["lesion_threshold"] == 0.3


def test_other_settings_and_weights_are_named(checkpoint_dir, tissue_dir, tmp_path):
    inputs, out = _folder(tissue_dir, tmp_path / "in", NAMES[:1]), tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 0
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out), "--tta",
                         "--no-anatomy", "--prob-encoding", "uint16")) == 1
    reason = _rows(_newest(out, "predictions"))[NAMES[0]]["reason"]
    assert "--tta" in reason and "--no-anatomy" in reason and "--prob-encoding" in reason and "uint16" in reason
    other = tmp_path / "other_weights"  # stage 1 the same file, stage 2 re-saved with other bytes
    shutil.copytree(checkpoint_dir, other)
    stage2 = other / "stage2" / "best_stage2.pth"
    import torch

    checkpoint = torch.load(stage2, map_location="cpu", weights_only=False)
    checkpoint["epoch"] = 7
    torch.save(checkpoint, stage2)
    assert ci.main(_args(other, "--image-dir", str(inputs), "--output-dir", str(out))) == 1
    reason = _rows(_newest(out, "predictions"))[NAMES[0]]["reason"]
    assert "other stage-2 weights" in reason and "stage-1" not in reason


def test_another_file_with_the_same_name_is_a_conflict(checkpoint_dir, tissue_dir, tmp_path, capsys):
    first = _folder(tissue_dir, tmp_path / "patient1", NAMES[:1], as_name="000000.png")
    second = _folder(tissue_dir, tmp_path / "patient2", NAMES[1:], as_name="000000.png")
    out = tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(first), "--output-dir", str(out))) == 0
    before = _digest(out)
    capsys.readouterr()
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(second), "--output-dir", str(out))) == 1
    assert "outputs exist, skipped" not in capsys.readouterr().out
    assert _digest(out) == before
    row = _rows(_newest(out, "predictions"))["000000.png"]
    assert row["status"] == "conflict" and "another file" in row["reason"] and "--overwrite" in row["reason"]
    # the single-file form is judged the same way
    assert ci.main(_args(checkpoint_dir, "--image", str(second / "000000.png"), "--output-dir", str(out))) == 1
    assert "another file" in capsys.readouterr().err and _digest(out) == before


def test_a_record_of_an_older_version_is_not_trusted(checkpoint_dir, tissue_dir, tmp_path):
    inputs, out = _folder(tissue_dir, tmp_path / "in", NAMES[:1]), tmp_path / "out"
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 0
    path = out / f"{Path(NAMES[0]).stem}.json"
    record = json.loads(path.read_text(encoding="utf-8"))
    del record["provenance"]
    path.write_text(json.dumps(record), encoding="utf-8")
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 1
    row = _rows(_newest(out, "predictions"))[NAMES[0]]
    assert row["status"] == "conflict" and "older version" in row["reason"] and "--overwrite" in row["reason"]
    assert "provenance" not in json.loads(path.read_text(encoding="utf-8"))  # not touched


# ------------------------------------------------------------------------------------------- one run per folder
def test_a_second_run_into_a_folder_in_use_is_refused_before_any_model_loads(checkpoint_dir, tissue_dir, tmp_path,
                                                                            capsys, no_model):
    inputs, out = _folder(tissue_dir, tmp_path / "in", NAMES[:1]), tmp_path / "out"
    out.mkdir()
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "started_utc": "2024-01-01T00:00:00+00:00"}
    (out / folder_lock.LOCK_NAME).write_text(json.dumps(owner), encoding="utf-8")  # a live run (this very process)
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 2
    line = _one_error_line(capsys)
    assert "in use" in line and str(os.getpid()) in line and str(out) in line
    assert json.loads((out / folder_lock.LOCK_NAME).read_text(encoding="utf-8")) == owner  # the other run's lock stays
    assert sorted(p.name for p in out.iterdir()) == [folder_lock.LOCK_NAME]


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_note(checkpoint_dir, tissue_dir, tmp_path, capsys):
    inputs, out = _folder(tissue_dir, tmp_path / "in", NAMES[:1]), tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"pid": dead.pid, "host": socket.gethostname(), "started_utc": "2024-01-01T00:00:00+00:00"}
    (out / folder_lock.LOCK_NAME).write_text(json.dumps(owner), encoding="utf-8")
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 0
    err = capsys.readouterr().err
    assert "took over" in err and str(dead.pid) in err
    assert not (out / folder_lock.LOCK_NAME).exists() and _rows(out / "predictions.csv")[NAMES[0]]["status"] == "ok"


def test_the_lock_is_released_when_the_run_fails_and_no_empty_folder_is_left(checkpoint_dir, tissue_dir, tmp_path,
                                                                            capsys):
    inputs = _folder(tissue_dir, tmp_path / "in", NAMES[:1])
    stage1 = str(checkpoint_dir / "stage1" / "best_stage1.pth")
    stage2 = str(checkpoint_dir / "stage2" / "best_stage2.pth")
    out = tmp_path / "new" / "out"
    args = ci.get_args_parser().parse_args(["--stage1-weights", stage2, "--stage2-weights", stage1, "--image-dir",
                                            str(inputs), "--output-dir", str(out), "--device", "cpu",
                                            "--backend", "torch"])
    assert ci.main(args) == 2  # swapped checkpoints: found when they load, after the lock was taken
    assert "swap" in _one_error_line(capsys)
    assert not (tmp_path / "new").exists()  # the folders this run made are removed again, the lock with them
    existing = tmp_path / "existing"
    existing.mkdir()
    args.output_dir = str(existing)
    assert ci.main(args) == 2 and existing.is_dir() and list(existing.iterdir()) == []


# ------------------------------------------------------------------------------------ broken links, output folder
def test_a_broken_link_is_listed_as_failed(checkpoint_dir, tissue_dir, tmp_path):
    inputs, out = _folder(tissue_dir, tmp_path / "in", NAMES[:1]), tmp_path / "out"
    target = tmp_path / "gone" / "scan.png"
    try:
        (inputs / "scan.png").symlink_to(target)
    except OSError:
        pytest.skip("symbolic links cannot be made here")
    items = {item.relative: item for item in listing.list_inputs(inputs, False, out)}
    assert items["scan.png"].status == "failed" and f"broken link to {target}" in items["scan.png"].reason
    assert ci.main(_args(checkpoint_dir, "--image-dir", str(inputs), "--output-dir", str(out))) == 1
    rows = _rows(out / "predictions.csv")
    assert rows["scan.png"]["status"] == "failed" and f"broken link to {target}" in rows["scan.png"]["reason"]
    assert rows[NAMES[0]]["status"] == "ok"
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["inputs"] == 2 and summary["counts"] == {"ok": 1, "failed": 1}
    assert [entry["input"] for entry in summary["failed"]] == ["scan.png"]


@pytest.mark.parametrize("mode", ["--image-dir", "--image"])
def test_an_output_folder_below_a_file_is_one_line_before_any_model_loads(mode, checkpoint_dir, tissue_dir, tmp_path,
                                                                         capsys, no_model):
    inputs = _folder(tissue_dir, tmp_path / "in", NAMES[:1])
    (tmp_path / "report.txt").write_text("a file\n", encoding="utf-8")
    out = tmp_path / "report.txt" / "predictions"
    source = inputs if mode == "--image-dir" else inputs / NAMES[0]
    assert ci.main(_args(checkpoint_dir, mode, str(source), "--output-dir", str(out))) == 2
    line = _one_error_line(capsys)
    assert "--output-dir" in line and "report.txt" in line and "is a file" in line
    assert (tmp_path / "report.txt").read_text(encoding="utf-8") == "a file\n"
