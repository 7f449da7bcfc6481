"""benchmark.py at tiny sizes: it runs, writes its JSON with every section, and its helpers compute the right
numbers. No timing assertion (the figures depend on the machine and its load)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mammo.cli import benchmark
from mammo.bench import speed
from mammo.bench import throughput


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--output", str(out), "--threads", "1", "--cascade-backends", "onnxruntime", "torch",
            "--folder-backends", "onnxruntime"]
    assert benchmark.main(benchmark.get_args_parser().parse_args(argv)) == 0
    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "matmul", "baseline", "stages", "cascade", "memory_large", "training",
                            "folder_throughput", "summary"}
    assert results["matmul"]["gflops_median"] > 0
    assert results["baseline"]["flops"] > 0 and results["baseline"]["size_hw"] == [64, 64]
    for name in ("stage1", "stage2"):
        stage = results["stages"][name]
        assert stage["trained"] is False and stage["input_size"] == [64, 64]
        assert set(stage["backends"]) == {"torch eager", "torch channels-last", "onnxruntime"}
        for item in stage["backends"].values():
            # achieved GFLOP/s is the stage's FLOPs over its latency
            assert item["gflops"] == pytest.approx(stage["flops"] / item["seconds_median"] / 1e9)
    for backend in ("torch", "onnxruntime"):
        run = results["cascade"]["backends"][backend]
        assert run["seconds_median"] > 0 and run["peak_rss_bytes"] >= run["rss_after_load_bytes"] > 0
        # the ratio uses the baseline timed in the same subprocess, interleaved with the cascade
        assert run["ratio_to_baseline"] == pytest.approx(run["seconds_median"] / run["baseline_seconds_median"])
        assert len(run["seconds_runs"]) == len(run["baseline_seconds_runs"]) == 1
        assert {"read", "preprocess", "stage1", "stage2", "write"} <= set(run["steps_seconds_median"])
    assert results["memory_large"]["size_hw"] == list(speed.QUICK["large_size"])
    assert set(results["training"]["workers"]) == {"0"}
    train = results["training"]["workers"]["0"]
    assert train["overhead_percent"] == pytest.approx(
        100 * (train["loader_step_seconds"] / train["cached_step_seconds"] - 1))
    folder = results["folder_throughput"]
    assert folder["n"] == throughput.QUICK["folder_images"] and folder["n_small"] == 2 and folder["repeats"] == 1
    assert folder["image"] == results["cascade"]["image"]
    assert set(folder["backends"]) == {"default", "onnxruntime"}
    assert folder["backends"]["default"]["backend_flag"] is None
    assert folder["backends"]["onnxruntime"]["resolved_backend"] == "onnxruntime"
    for item in (folder["plain"], *folder["backends"].values()):
        # whole processes ran and reported their own peak RSS; the per-image time is their difference. Its sign is
        # not asserted: at --quick sizes one image's work is smaller than the start-up noise of a process
        assert min(item["seconds_n_runs"] + item["seconds_small_runs"]) > 0 and item["peak_rss_bytes"] > 0
        assert isinstance(item["per_image_ms"], float) and math.isfinite(item["per_image_ms"])
        assert item["per_image_ms"] == pytest.approx(
            1e3 * (item["seconds_n_runs"][0] - item["seconds_small_runs"][0]) / (folder["n"] - 2))
    for item in folder["backends"].values():
        assert item["ratio_to_plain"] == pytest.approx(item["per_image_ms"] / folder["plain"]["per_image_ms"])
    memory = folder["memory_onnxruntime"]
    assert memory["backend"] == "onnxruntime" and memory["peak_rss_bytes"] > 0 and memory["seconds"] > 0
    assert set(results["summary"]) == {"cascade_over_baseline", "compute_fraction_of_peak", "loader_overhead_percent",
                                       "peak_rss_large_gb", "folder_over_plain", "peak_rss_onnxruntime_gb"}
    for item in results["summary"].values():
        assert isinstance(item["met"], bool) and math.isfinite(item["value"])
    printed = capsys.readouterr().out
    assert "fp32 matmul peak" in printed and "targets:" in printed and "folder throughput" in printed
    # an existing output is not overwritten without --overwrite
    assert benchmark.main(benchmark.get_args_parser().parse_args(argv)) == 2


def test_count_flops_of_one_convolution():
    conv = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
    # 2 FLOPs per multiply-add: 2 * (8 outputs * 9 taps) per pixel of a 32 x 64 image
    assert speed.count_flops(conv, (32, 64)) == 2 * 8 * 9 * 32 * 64


def test_median_seconds_counts_calls():
    calls = []
    timing = speed.median_seconds(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and len(timing["runs"]) == 3 and timing["min"] <= timing["median"]


def test_peak_rss_is_plausible():
    before = speed.peak_rss_bytes()
    block = bytearray(64 * 2**20)  # 64 MiB, touched
    for i in range(0, len(block), 4096):
        block[i] = 1
    assert speed.peak_rss_bytes() >= before
    assert speed.peak_rss_bytes() > 64 * 2**20


def test_missing_inputs_are_usage_errors(tmp_path):
    for flag in ("--image", "--stage1-weights"):
        argv = ["--quick", "--output", str(tmp_path / "b.json"), flag, str(tmp_path / "missing")]
        assert benchmark.main(benchmark.get_args_parser().parse_args(argv)) == 2
    # issue 13 asks for at least 12 images in the large folder; fewer only with --quick (and always more than 2)
    for argv in (["--folder-images", "11"], ["--quick", "--folder-images", "2"]):
        assert benchmark.main(
            benchmark.get_args_parser().parse_args(argv + ["--output", str(tmp_path / "b.json")])) == 2
    assert not (tmp_path / "b.json").exists()


def test_per_image_time_by_difference():
    # 12 images in 20 s, 2 in 5 s: 1.5 s per image, the 2 s of start-up cancel out
    assert throughput.per_image_seconds(20.0, 5.0, 12) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="more images"):
        throughput.per_image_seconds(3.0, 2.0, 2)


def test_run_measured_reports_the_childs_own_peak(tmp_path):
    script = tmp_path / "allocate.py"
    script.write_text("import sys\nblock = bytearray(int(sys.argv[1]) * 2**20)\n"
                      "block[::4096] = b'x' * len(block[::4096])\n")
    env = throughput.child_env(1)
    big = throughput.run_measured(script, ["200"], tmp_path / "big.rss", env)
    small = throughput.run_measured(script, ["1"], tmp_path / "small.rss", env)
    assert big["seconds"] > 0 and big["peak_rss_bytes"] >= 200 * 2**20
    # each child's own high-water mark: the first child's 200 MiB does not carry over to the second
    assert small["peak_rss_bytes"] < 100 * 2**20
    failing = tmp_path / "fail.py"
    failing.write_text("import sys\nsys.exit('broken input')\n")
    with pytest.raises(RuntimeError, match="broken input"):
        throughput.run_measured(failing, [], tmp_path / "fail.rss", env)


def test_folders_hold_linked_copies(tmp_path):
    image = tmp_path / "scan.png"
    image.write_bytes(b"png bytes")
    folders = throughput.make_folders(image, (12, 2), tmp_path / "work")
    assert sorted(p.name for p in folders[2].iterdir()) == ["scan_000.png", "scan_001.png"]
    assert len(list(folders[12].iterdir())) == 12
    assert all(p.read_bytes() == b"png bytes" for p in folders[12].iterdir())


def test_folder_targets_and_table():
    folder = {"image": "x.png", "image_size_hw": [2944, 1920], "n": 12, "n_small": 2, "repeats": 2,
              "plain": {"per_image_ms": 650.0, "startup_seconds": 3.0, "peak_rss_bytes": 6e8},
              "backends": {"default": {"per_image_ms": 455.0, "ratio_to_plain": 0.7, "startup_seconds": 4.0,
                                       "peak_rss_bytes": 9e8, "resolved_backend": "onnxruntime"}},
              "memory_onnxruntime": {"backend": "onnxruntime", "image_size_hw": [2944, 1920],
                                     "peak_rss_bytes": 1.2e9, "seconds": 6.0}}
    summary = throughput.summarize({"folder_throughput": folder})
    assert summary["folder_over_plain"]["met"] is True and summary["folder_over_plain"]["stretch_met"] is False
    assert summary["peak_rss_onnxruntime_gb"]["value"] == pytest.approx(1.2)
    assert summary["peak_rss_onnxruntime_gb"]["met"] is False
    assert "0.70 x plain" in "\n".join(throughput.table_lines({"folder_throughput": folder}))
    # a per-image time swamped by noise (<= 0) is never judged met
    folder["backends"]["default"].update(per_image_ms=-10.0, ratio_to_plain=-10.0 / 650.0)
    assert throughput.summarize({"folder_throughput": folder})["folder_over_plain"]["met"] is False
    # --skip-folder: no section, no targets, no lines
    assert throughput.summarize({}) == {} and throughput.table_lines({}) == []


def test_stages_default_to_the_shipped_model(tmp_path, monkeypatch):
    """Without weights the benchmark measures what cascade_inference.py runs: the shipped model files; --quick,
    --stageN-size or a missing shipped file give an untrained network (None) for that stage only."""
    (tmp_path / "stage1.safetensors").write_bytes(b"x")  # only its existence is looked at here
    monkeypatch.setenv("MAMMO_WEIGHTS_DIR", str(tmp_path))
    parse = benchmark.get_args_parser().parse_args
    assert benchmark.stage_weights(parse([])) == (str(tmp_path / "stage1.safetensors"), None)
    assert benchmark.stage_weights(parse(["--quick"])) == (None, None)
    assert benchmark.stage_weights(parse(["--stage1-size", "256", "128"])) == (None, None)
    assert benchmark.stage_weights(parse(["--stage2-weights", "given.pth"])) == (str(tmp_path / "stage1.safetensors"),
                                                                                 "given.pth")
