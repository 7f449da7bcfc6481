"""benchmark.py at tiny sizes: it runs, writes its JSON with every section, and its helpers compute the right
numbers. No timing assertion (the figures depend on the machine and its load)."""

from __future__ import annotations

import json
import math

import pytest
import torch

import benchmark
import speed


def test_quick_run_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--output", str(out), "--threads", "1", "--cascade-backends", "onnxruntime", "torch"]
    assert benchmark.main(benchmark.get_args_parser().parse_args(argv)) == 0
    results = json.loads(out.read_text())
    assert set(results) >= {"machine", "matmul", "baseline", "stages", "cascade", "memory_large", "training", "summary"}
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
    assert train["overhead_percent"] == pytest.approx(100 * (train["loader_step_seconds"] / train["cached_step_seconds"] - 1))
    assert set(results["summary"]) == {"cascade_over_baseline", "compute_fraction_of_peak", "loader_overhead_percent",
                                       "peak_rss_large_gb"}
    for item in results["summary"].values():
        assert isinstance(item["met"], bool) and math.isfinite(item["value"])
    printed = capsys.readouterr().out
    assert "fp32 matmul peak" in printed and "targets:" in printed
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
    assert not (tmp_path / "b.json").exists()
