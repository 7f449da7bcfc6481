"""cascade_inference.py under torchrun: 2 CPU processes over gloo split a folder, each writes its own images'
outputs, rank 0 merges predictions.csv and summary.json in input order; the outputs equal a single-process run, and
an interrupted run continues where it stopped (issue 13)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from mammo import imaging
from mammo.inference import listing

ROOT = Path(__file__).resolve().parents[1]


def _run(argv: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"]
    command = [*launcher, str(ROOT / "cascade_inference.py"), *argv] if nproc > 1 else [
        sys.executable, str(ROOT / "cascade_inference.py"), *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _rows(folder: Path) -> list[dict]:
    with (folder / "predictions.csv").open(encoding="utf-8", newline="") as stream:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(stream)]


def test_two_gloo_processes_split_a_folder_and_merge_in_input_order(checkpoint_dir, tissue_dir, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    names = sorted(p.name for p in (tissue_dir / "fgt_seg").glob("*.png"))[:4]
    for name in names:
        shutil.copy(tissue_dir / "fgt_seg" / name, inputs / name)
    (inputs / "notes.txt").write_text("not an image\n", encoding="utf-8")
    common = ["--checkpoint-dir", str(checkpoint_dir), "--image-dir", str(inputs), "--device", "cpu",
              "--backend", "torch", "--no-visualization"]
    _run([*common, "--output-dir", str(tmp_path / "one")], 1, tmp_path)
    double = _run([*common, "--output-dir", str(tmp_path / "two")], 2, tmp_path)
    assert double.stdout.count("Summary") == 1  # rank 0 alone prints the run's summary
    for name in names:  # each image written once, by one rank, with the single process's values
        stem = Path(name).stem
        tissue_one = imaging.read_image(tmp_path / "one" / f"{stem}_tissue_seg.png").pixels
        np.testing.assert_array_equal(imaging.read_image(tmp_path / "two" / f"{stem}_tissue_seg.png").pixels,
                                      tissue_one)
        prob = [imaging.read_image(tmp_path / run / f"{stem}_cancer_prob.png").pixels.astype(int)
                for run in ("one", "two")]
        assert np.abs(prob[0] - prob[1]).max() <= 1  # uint8 probabilities: 1e-4 apart at most before rounding
    assert _rows(tmp_path / "two") == _rows(tmp_path / "one")
    assert [row["input"] for row in _rows(tmp_path / "two")] == sorted([*names, "notes.txt"])
    summaries = [json.loads((tmp_path / run / "summary.json").read_text(encoding="utf-8")) for run in ("one", "two")]
    assert summaries[1]["counts"] == summaries[0]["counts"] == {"ok": len(names), "not_image": 1}
    assert summaries[1]["density_percent"] == summaries[0]["density_percent"]

    # an interrupted run continues: two images lost their JSON (written last), so they count as unfinished
    for name in names[:2]:
        (tmp_path / "two" / f"{Path(name).stem}.json").unlink()
    again = _run([*common, "--output-dir", str(tmp_path / "two")], 2, tmp_path)
    assert again.stdout.count("outputs exist, skipped") == len(names) - 2
    assert sorted(p.name for p in (tmp_path / "two").glob("*.json") if not p.name.startswith("summary")) == sorted(
        f"{Path(n).stem}.json" for n in names)
    newest = max((tmp_path / "two").glob("predictions*.csv"), key=lambda p: p.stat().st_mtime_ns)
    with newest.open(encoding="utf-8", newline="") as stream:
        statuses = {row["input"]: row["status"] for row in csv.DictReader(stream)}
    assert statuses == {**{n: "ok" for n in names[:2]}, **{n: "exists" for n in names[2:]}, "notes.txt": "not_image"}


def test_shards_cover_the_inputs_once_and_merge_back_in_order(tmp_path):
    items = [listing.InputItem(tmp_path / f"{i}.png", f"{i}.png", tmp_path, str(i)) for i in range(7)]
    shards = [listing.shard(items, rank, 3) for rank in range(3)]
    assert [len(s) for s in shards] == [3, 2, 2]
    assert listing.merge_shards(shards[::-1]) == items
    try:
        listing.merge_shards(shards[:2])
    except ValueError as error:
        assert "different inputs" in str(error)
    else:
        raise AssertionError("a missing shard must be an error")
