"""Measuring the cascade's speed and memory on this machine: timers, peak memory, FLOPs, the benchmark's parts.

What lives here (the command line that runs them in order and writes ``benchmark.json`` is
``mammo/cli/benchmark.py``, whose face is the root ``benchmark.py``):

- timing and the machine: :func:`median_seconds`, :func:`interleaved_seconds` (round-robin, one machine load for
  all), :func:`peak_rss_bytes`, :func:`cpu_name`, :func:`load_average`, :func:`machine_info`, :func:`count_flops`,
  :func:`matmul_fn` (the fp32 matmul peak);
- the contenders and their inputs: :func:`baseline_model` (``smp.Unet("resnet34")``), :func:`prepare_stages`
  (given or untrained stage checkpoints), :func:`logits_call`, :func:`cascade_image`, :func:`large_image`,
  :func:`synthetic_16bit`;
- the measurements: :func:`measure_networks` (matmul, baseline and each stage under every backend, interleaved),
  :func:`run_child` / :func:`child_main` (the whole cascade in a fresh process, for its own peak RSS),
  :func:`measure_training` (a stage-1 training step with the real loader vs batches in memory);
- the verdict: :data:`TARGETS`, :func:`summarize` and :func:`format_table` (the printed table), the folder-throughput
  part of both from ``mammo/bench/throughput.py`` (whole-process folder runs against a plain tool, issue 13's
  part 5).

Every runner built from a stage checkpoint comes from ``mammo.weights.runners.make_runner`` (torch eager,
channels-last, ONNX Runtime); only the baseline, which is no checkpoint, is wrapped in ``runners.TorchRunner``
directly.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from mammo.weights import checkpoints
from mammo import imaging
from mammo.weights import runners
from mammo.bench import throughput
from mammo.nn.models import build_model, default_model_config

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # mammo/bench/ -> the checkout
SHARED_DATA = Path(os.environ.get("MAMMO_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))
#: The real 16-bit full-field mammogram used by default (NYU sample data, 2944 x 1920, see ../shared/data/README.md).
DEFAULT_IMAGE = SHARED_DATA / "nyu_16bit" / "images" / "0_R-CC.png"
DEFAULT_TISSUE_DIR = SHARED_DATA / "tissue" / "train_valid"

#: Default network sizes of the two stages (pixels, H x W) when no checkpoint is given: the cascade's defaults.
DEFAULT_STAGE1_SIZE, DEFAULT_STAGE2_SIZE = (512, 512), (384, 384)
BASELINE_SIZE = (512, 512)
LARGE_SIZE = (4096, 3328)  # the issue's memory test: a 4096 x 3328 16-bit input

#: Targets of the project issue (issue 13); the folder-throughput and ONNX Runtime memory ones are
#: ``throughput.TARGETS``.
TARGETS = {"cascade_over_baseline_max": 1.0, "compute_fraction_of_peak_min": 0.75,
           "loader_overhead_percent_max": 10.0, "peak_rss_large_gb_max": 2.0, **throughput.TARGETS}

#: ``--quick``: tiny sizes and one repetition of everything (a smoke test for the tests; its numbers mean nothing).
QUICK = {"stage1_size": (64, 64), "stage2_size": (64, 64), "baseline_size": (64, 64), "matmul_size": 256,
         "large_size": (320, 256), "repeats": 1, "warmup": 1, "train_steps": 1, "train_batch_size": 2,
         "workers": [0], "image_size": (256, 192)}

#: Each stage is timed under these: (label in benchmark.json, ``runners.make_runner`` backend, channels_last).
STAGE_BACKENDS = (("torch eager", "torch", False), ("torch channels-last", "torch", True),
                  ("onnxruntime", "onnxruntime", False))


# ---------------------------------------------------------------------------------------------- timing and the machine
def median_seconds(fn: Callable[[], object], repeats: int, warmup: int) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds: ``{"median", "min", "runs"}``."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - start)
    return {"median": statistics.median(runs), "min": min(runs), "runs": runs}


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, dict]:
    """Time several functions round-robin: ``warmup`` untimed rounds, then ``repeats`` timed rounds of each in turn.

    Interleaving makes every function see the same machine load (other processes come and go), so their ratios
    stay meaningful on a shared machine where absolute times do not.

    Returns:
        ``{name: {"median", "min", "runs"}}`` in seconds.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: {"median": statistics.median(r), "min": min(r), "runs": r} for name, r in runs.items()}


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, bytes.

    Linux: ``VmHWM`` of ``/proc/self/status`` (the high-water mark of this program's memory map, reset by ``exec``).
    ``getrusage(...).ru_maxrss`` is not used there: Linux carries it across ``exec``, so a child started by a big
    parent would report the parent's peak. Elsewhere: ``ru_maxrss`` (bytes on macOS, kB otherwise).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``), or None where there are none."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(threads: int) -> dict:
    """What the benchmark runs on: CPU, cores this process may use, ``threads`` used, platform, library versions,
    whether MKL-DNN is there, and the load average at the start (``load_average_end`` is added at the end)."""
    import onnxruntime

    return {"cpu": cpu_name(), "cores_available": runners.available_cores(), "threads": threads,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "mkldnn": torch.backends.mkldnn.is_available(),
            "load_average_start": load_average()}


def count_flops(model: torch.nn.Module, size_hw: tuple[int, int]) -> int:
    """FLOPs of one forward pass on a ``(1, 1, H, W)`` input (torch's flop counter: 2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 1, *size_hw))
    return int(counter.get_total_flops())


def matmul_fn(n: int) -> Callable[[], object]:
    """One fp32 ``torch.matmul`` of two ``n x n`` matrices (2 n^3 FLOPs), as a function to time."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    out = torch.empty(n, n)
    return lambda: torch.matmul(a, b, out=out)


# ----------------------------------------------------------------------------------------------- contenders and inputs
def baseline_model() -> torch.nn.Module:
    """The baseline network: ``smp.Unet("resnet34")``, one input channel, 4 classes, random weights, eval mode."""
    import segmentation_models_pytorch as smp

    return smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=4).eval()


def _stage_checkpoint(stage: int, size_hw: tuple[int, int], seed: int = 0) -> dict:
    """An untrained stage checkpoint at the default model config and ``size_hw`` (seeded: the same weights each run)."""
    torch.manual_seed(seed + stage)
    config = default_model_config(4 if stage == 1 else 1)
    return checkpoints.make_checkpoint(stage=stage, model=build_model(config), model_config=config,
                                       preprocess_config=imaging.DEFAULT_PREPROCESS, input_size=size_hw)


def prepare_stages(weights: tuple[str | None, str | None], sizes_hw: tuple[tuple[int, int], tuple[int, int]],
                   work: Path, quick: bool) -> tuple[dict, dict, dict]:
    """Stage checkpoints, given or untrained, saved under ``work``: ``(paths, checkpoints, description)``.

    Args:
        weights: the stage-1 and stage-2 checkpoint paths, None for an untrained model.
        sizes_hw: network size (pixels) of each untrained stage (rounded by ``imaging.network_size``; with ``quick``
            :data:`QUICK`'s sizes are used instead).

    Returns:
        three dicts keyed ``"stage1"`` / ``"stage2"``: the checkpoint files, the checkpoint dicts and what
        ``benchmark.json`` says of each stage (weights, trained, input size, model config).

    Raises:
        FileNotFoundError, ValueError: a given checkpoint cannot be read (``checkpoints.load_checkpoint``).
    """
    paths, stage_checkpoints, described = {}, {}, {}
    for stage, given, size in ((1, weights[0], sizes_hw[0]), (2, weights[1], sizes_hw[1])):
        name = f"stage{stage}"
        if given:
            stage_checkpoints[name] = checkpoints.load_checkpoint(given)
            paths[name] = Path(given)
            described[name] = {"weights": str(given), "trained": True}
        else:
            size = QUICK[f"stage{stage}_size"] if quick else imaging.network_size(list(size))
            stage_checkpoints[name] = _stage_checkpoint(stage, size)
            paths[name] = checkpoints.save_checkpoint(stage_checkpoints[name], work / f"{name}.pth")
            described[name] = {"weights": None, "trained": False,
                               "note": "untrained model (speed does not depend on the weights)"}
        described[name]["input_size"] = [int(v) for v in stage_checkpoints[name]["input_size"]]
        described[name]["model_config"] = {k: v for k, v in stage_checkpoints[name]["model_config"].items()
                                           if k != "encoder_weights"}
    return paths, stage_checkpoints, described


def logits_call(fn: Callable[[np.ndarray], np.ndarray], size_hw: tuple[int, int]) -> Callable[[], object]:
    """One batch-1 call of a logits function on a fixed random ``(1, 1, H, W)`` input, as a function to time."""
    batch = np.random.default_rng(0).random((1, 1, *size_hw), dtype=np.float32)
    return lambda: fn(batch)


def synthetic_16bit(size_hw: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A mammogram-like ``(H, W)`` uint16 image (``synthetic.make_case`` scaled to 16 bit) when no real one exists."""
    import cv2

    from mammo.data.synthetic import make_case

    case = make_case(0, seed=seed)
    image = cv2.resize(case.image, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
    return image.astype(np.uint16) * 257


def cascade_image(given: str | None, work: Path, quick: bool) -> tuple[Path, str]:
    """The whole-cascade input and a note on it: ``given``, else :data:`DEFAULT_IMAGE` (downscaled to
    ``QUICK["image_size"]`` under ``work`` with ``quick``), else a synthetic 16-bit image written under ``work``."""
    if given:
        return Path(given), "given"
    if DEFAULT_IMAGE.is_file() and not quick:
        return DEFAULT_IMAGE, "real NYU 16-bit full-field mammogram"
    if DEFAULT_IMAGE.is_file():
        import cv2

        pixels = imaging.read_image(DEFAULT_IMAGE).pixels
        small = cv2.resize(pixels, QUICK["image_size"][::-1], interpolation=cv2.INTER_AREA)
        return imaging.write_png(work / "quick_16bit.png", small), "real NYU image, downscaled (--quick)"
    size = QUICK["image_size"] if quick else (2944, 1920)
    written = imaging.write_png(work / "synthetic_16bit.png", synthetic_16bit(size))
    return written, "synthetic 16-bit (no real image found)"


def large_image(source: Path, size_hw: tuple[int, int], work: Path) -> Path:
    """The memory-test input: the real image upscaled (linear) to ``size_hw``, kept 16-bit."""
    import cv2

    pixels = imaging.read_image(source).pixels
    if pixels.dtype != np.uint16:
        pixels = pixels.astype(np.uint16) * 257
    large = cv2.resize(pixels, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
    return imaging.write_png(work / f"large_{size_hw[0]}x{size_hw[1]}_16bit.png", large)


# ------------------------------------------------------------------------------------------------------------ networks
def _matmul_entry(n: int, timing: dict) -> dict:
    flops = 2.0 * n**3
    return {"n": n, "seconds_median": timing["median"], "gflops_median": flops / timing["median"] / 1e9,
            "gflops_best": flops / timing["min"] / 1e9}


def measure_networks(stage_checkpoints: dict[str, dict], baseline_size: tuple[int, int], matmul_n: int, repeats: int,
                     warmup: int, threads: int) -> dict:
    """The fp32 matmul peak, the baseline and every stage under every backend of :data:`STAGE_BACKENDS`, timed
    round-robin (:func:`interleaved_seconds`) so that all see the same machine load; batch 1, fixed random input.

    Returns:
        ``{"matmul": {"n", "seconds_median", "gflops_median", "gflops_best"}, "baseline": {..., "flops",
        "seconds_median", "gflops", "fraction_of_peak"}, "stages": {name: {"flops", "backends": {backend:
        {"seconds_median", "seconds_min", "gflops", "fraction_of_peak"}}}}}``; achieved GFLOP/s = FLOPs / median
        latency, fraction of peak = that / the matmul's median GFLOP/s.
    """
    base = baseline_model()
    base_flops = count_flops(base, baseline_size)
    calls = {"matmul": matmul_fn(matmul_n), "baseline": logits_call(runners.TorchRunner(base), baseline_size)}
    stages = {}
    for name, checkpoint in stage_checkpoints.items():
        size = tuple(int(v) for v in checkpoint["input_size"])
        stages[name] = {"flops": count_flops(checkpoints.model_from_checkpoint(checkpoint), size)}
        for label, backend, channels_last in STAGE_BACKENDS:
            runner = runners.make_runner(checkpoint, backend, "cpu", channels_last=channels_last, threads=threads)
            calls[f"{name}/{label}"] = logits_call(runner, size)
    timings = interleaved_seconds(calls, repeats, warmup)
    matmul = _matmul_entry(matmul_n, timings["matmul"])
    peak = matmul["gflops_median"]
    base_time = timings["baseline"]
    baseline = {"model": 'smp.Unet("resnet34", in_channels=1, classes=4)', "backend": "torch eager",
                "batch": 1, "size_hw": list(baseline_size), "flops": base_flops,
                "seconds_median": base_time["median"], "seconds_min": base_time["min"],
                "gflops": base_flops / base_time["median"] / 1e9,
                "fraction_of_peak": base_flops / base_time["median"] / 1e9 / peak}
    for name, entry in stages.items():
        entry["backends"] = {}
        for label, _, _ in STAGE_BACKENDS:
            timing = timings[f"{name}/{label}"]
            gflops = entry["flops"] / timing["median"] / 1e9
            entry["backends"][label] = {"seconds_median": timing["median"], "seconds_min": timing["min"],
                                        "gflops": gflops, "fraction_of_peak": gflops / peak}
    return {"matmul": matmul, "baseline": baseline, "stages": stages}


# -------------------------------------------------------------------------------------------------------- subprocesses
def run_child(spec: dict, timeout_s: float = 1800) -> dict:
    """Run :func:`child_main` in a fresh Python process (own peak RSS) and return its result dict.

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="bench_child_") as folder:
        spec = dict(spec, result_path=str(Path(folder) / "result.json"), work_dir=folder)
        spec_path = Path(folder) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        env = throughput.child_env(spec["threads"])  # the project on PYTHONPATH, OMP / MKL threads
        code = "import sys; from mammo.bench import speed; sys.exit(speed.child_main(sys.argv[1]))"
        proc = subprocess.run([sys.executable, "-c", code, str(spec_path)], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout_s)
        result_path = Path(spec["result_path"])
        if proc.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"benchmark subprocess ({spec['kind']}) failed with status {proc.returncode}: "
                               f"{proc.stderr[-2000:]}")
        return json.loads(result_path.read_text())


def child_main(spec_path: str) -> int:
    """Entry point of a measurement subprocess: the whole cascade on one image file; timings and peak RSS.

    Phase 1 runs the cascade ``max(1, warmup)`` times alone and reads the peak RSS (so the figure holds the cascade
    only). Phase 2, when ``baseline_size`` is given, times the cascade and the baseline's batch-1 eager pass
    round-robin (:func:`interleaved_seconds`), so their ratio is taken under one machine load; otherwise the
    phase-1 runs are the timings.

    Args:
        spec_path: JSON written by :func:`run_child`: ``backend``, ``threads``, ``stage1``, ``stage2``, ``image``,
            ``repeats``, ``warmup``, optional ``baseline_size``, ``result_path``, ``work_dir``.
    """
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec["threads"]))
    # imported in the child only (the parent never loads the cascade), before the first RSS reading
    from mammo.inference import predict
    from mammo.cascade import load
    from mammo.inference import outputs

    rss_start = peak_rss_bytes()
    start = time.perf_counter()
    loaded = load.load_cascade(spec["stage1"], spec["stage2"], device="cpu", backend=spec["backend"])
    load_s = time.perf_counter() - start
    rss_loaded = peak_rss_bytes()
    image_path = Path(spec["image"])
    steps: list[dict] = []

    def run_cascade() -> None:
        prediction = predict.run_image(loaded, image_path)
        record = outputs.write_outputs(prediction, Path(spec["work_dir"]) / "outputs", image_path.stem,
                                       visualization=False, overwrite=True)
        steps.append(record["timings_s"])

    alone = [median_seconds(run_cascade, 1, 0)["median"] for _ in range(max(1, int(spec["warmup"])))]
    result = {"backend": spec["backend"], "image": str(image_path), "threads": int(spec["threads"]),
              "load_seconds": load_s, "first_runs_seconds": alone, "rss_after_imports_bytes": rss_start,
              "rss_after_load_bytes": rss_loaded, "peak_rss_bytes": peak_rss_bytes()}
    if spec.get("baseline_size"):
        size = tuple(spec["baseline_size"])
        steps.clear()
        timings = interleaved_seconds({"cascade": run_cascade,
                                       "baseline": logits_call(runners.TorchRunner(baseline_model()), size)},
                                      int(spec["repeats"]), 1)
        del steps[0]  # the warm-up round
        result.update(seconds_median=timings["cascade"]["median"], seconds_min=timings["cascade"]["min"],
                      seconds_runs=timings["cascade"]["runs"], baseline_seconds_median=timings["baseline"]["median"],
                      baseline_seconds_runs=timings["baseline"]["runs"],
                      ratio_to_baseline=timings["cascade"]["median"] / timings["baseline"]["median"])
    else:
        result.update(seconds_median=statistics.median(alone), seconds_min=min(alone), seconds_runs=alone)
    step_names = sorted({k for s in steps for k in s})
    result["steps_seconds_median"] = {k: statistics.median(s.get(k, 0.0) for s in steps) for k in step_names}
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------------------ training
def measure_training(tissue_source: str | os.PathLike | None, size_hw: tuple[int, int], batch_size: int, steps: int,
                     workers: list[int], seed: int = 0) -> dict:
    """Stage-1 training step time with the real data loader vs batches already in memory.

    The loader is the training script's (``engine.make_loader``: ``SeededItems`` over
    ``datasets.TissueDataset`` with ``datasets.tissue_augmentation``, ``EpochSampler``, persistent workers). A step is
    forward + ``TissueLoss`` + ``l1_penalty`` (5e-5, the training default) + backward + AdamW.

    Returns:
        dict with, per worker count, the medians over ``steps`` interleaved pairs (after one warm-up step) of
        ``cached_step_seconds``, ``loader_step_seconds``, ``data_wait_seconds`` (time blocked on the loader) and
        ``overhead_percent`` = (loader step / cached step - 1) x 100; ``cached_step_seconds`` over all pairs.
    """
    from mammo.data import splits
    from mammo.training import datasets
    from mammo.training import engine
    from mammo.nn.losses import TissueLoss, l1_penalty

    if tissue_source is None:
        tissue_source = _synthetic_tissue_set(Path(tempfile.mkdtemp(prefix="bench_tissue_")),
                                              n=max(4, batch_size * (steps + 1)))
    table = splits.read_tissue_table(tissue_source)
    torch.manual_seed(seed)
    model = build_model(default_model_config(4)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    criterion = TissueLoss()

    def step(batch: dict) -> None:
        loss = criterion(model(batch["image"]), batch["mask"]) + l1_penalty(model, 5e-5)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def loader(num_workers: int):
        dataset = datasets.TissueDataset(table, size_hw, augment=engine.SeedableAugment(datasets.tissue_augmentation()))
        sampler = engine.EpochSampler(len(dataset), seed, shuffle=True)
        return engine.make_loader(dataset, sampler, batch_size, num_workers, train=True, device=torch.device("cpu"))

    def batches(num_workers: int):
        epoch = 0
        while True:
            data = loader(num_workers)
            data.sampler.set_epoch(epoch)
            yield from data
            epoch += 1

    # batches already in memory; each loader step is timed right after a cached step (interleaved, so both see the
    # same machine load). With workers, their prefetching may overlap a cached step: at most one batch's loading
    # work (see data_wait_seconds with 0 workers), which makes the overhead a slight underestimate.
    source = batches(0)
    cached = [next(source) for _ in range(steps)]
    source.close()
    step(cached[0])  # warm-up
    result = {"images": len(table), "size_hw": list(size_hw), "batch_size": batch_size, "steps": steps,
              "loader": "engine.make_loader (TissueDataset + tissue_augmentation)", "workers": {}}
    cached_all = []
    for num_workers in workers:
        source = batches(num_workers)
        step(next(source))  # warm-up (starts the workers)
        cached_s, loader_s, wait_s = [], [], []
        for index in range(steps):
            start = time.perf_counter()
            step(cached[index])
            cached_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            batch = next(source)
            wait_s.append(time.perf_counter() - start)
            step(batch)
            loader_s.append(time.perf_counter() - start)
        source.close()
        cached_all += cached_s
        result["workers"][str(num_workers)] = {
            "cached_step_seconds": statistics.median(cached_s), "loader_step_seconds": statistics.median(loader_s),
            "data_wait_seconds": statistics.median(wait_s),
            "overhead_percent": 100.0 * (statistics.median(loader_s) / statistics.median(cached_s) - 1.0),
            "cached_runs": cached_s, "loader_runs": loader_s}
    result["cached_step_seconds"] = statistics.median(cached_all)
    return result


def _synthetic_tissue_set(folder: Path, n: int) -> Path:
    """A DDSM-layout tissue folder of ``n`` synthetic cases (when the real set is absent)."""
    from mammo.data.synthetic import make_case

    for sub in ("fgt_seg", "fgt_seg_labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for index in range(n):
        case = make_case(index)
        imaging.write_png(folder / "fgt_seg" / f"{case.name}.png", case.image)
        imaging.write_png(folder / "fgt_seg_labels" / f"{case.name}_LI.png", case.tissue_label)
    return folder


# --------------------------------------------------------------------------------------------------- summary and table
def summarize(results: dict) -> dict:
    """The issue's targets: measured value, target, met (bool); with a folder-throughput section also its two
    (``throughput.summarize``: folder time over the plain tool's, with a stretch target, and ONNX Runtime peak RSS)."""
    summary = {}
    cascade_runs = results.get("cascade", {}).get("backends", {})
    if cascade_runs:
        best = min(cascade_runs, key=lambda b: cascade_runs[b]["seconds_median"])
        ratio = cascade_runs[best]["ratio_to_baseline"]
        summary["cascade_over_baseline"] = {"value": ratio, "backend": best,
                                            "target_max": TARGETS["cascade_over_baseline_max"],
                                            "met": ratio <= TARGETS["cascade_over_baseline_max"]}
    fractions = {(stage, backend): item["fraction_of_peak"] for stage, entry in results.get("stages", {}).items()
                 for backend, item in entry.get("backends", {}).items()}
    if fractions:
        # the fastest backend (by total latency of both stages)
        backends = {b for _, b in fractions}
        total = {b: sum(results["stages"][s]["backends"][b]["seconds_median"] for s in results["stages"])
                 for b in backends}
        fastest = min(total, key=total.get)
        flops = sum(results["stages"][s]["flops"] for s in results["stages"])
        fraction = flops / total[fastest] / 1e9 / results["matmul"]["gflops_median"]
        summary["compute_fraction_of_peak"] = {"value": fraction, "backend": fastest,
                                               "target_min": TARGETS["compute_fraction_of_peak_min"],
                                               "met": fraction >= TARGETS["compute_fraction_of_peak_min"]}
    workers = results.get("training", {}).get("workers", {})
    if workers:
        best = min(workers, key=lambda w: workers[w]["overhead_percent"])
        value = workers[best]["overhead_percent"]
        summary["loader_overhead_percent"] = {"value": value, "num_workers": int(best),
                                              "target_max": TARGETS["loader_overhead_percent_max"],
                                              "met": value <= TARGETS["loader_overhead_percent_max"]}
    if "memory_large" in results:
        gb = results["memory_large"]["peak_rss_bytes"] / 1e9
        summary["peak_rss_large_gb"] = {"value": gb, "size_hw": results["memory_large"]["size_hw"],
                                        "target_max": TARGETS["peak_rss_large_gb_max"],
                                        "met": gb < TARGETS["peak_rss_large_gb_max"]}
    summary.update(throughput.summarize(results))
    return summary


def format_table(results: dict) -> str:
    """The results as a plain-text table."""
    lines = []
    machine, peak = results["machine"], results["matmul"]
    lines.append(f"machine: {machine['cpu']} | {machine['threads']} thread(s) | torch {machine['torch']} | "
                 f"onnxruntime {machine['onnxruntime']} | load {machine['load_average_start']} -> "
                 f"{machine.get('load_average_end')}")
    lines.append(f"fp32 matmul peak (n={peak['n']}): {peak['gflops_median']:.1f} GFLOP/s "
                 f"(best {peak['gflops_best']:.1f})")
    lines.append("")
    lines.append(f"{'network':<34}{'size':>10}{'GFLOP':>9}{'latency ms':>12}{'GFLOP/s':>10}{'% peak':>8}")
    base = results["baseline"]
    lines.append(f"{'baseline smp.Unet r34, eager':<34}{'x'.join(map(str, base['size_hw'])):>10}"
                 f"{base['flops'] / 1e9:>9.2f}{base['seconds_median'] * 1e3:>12.1f}{base['gflops']:>10.1f}"
                 f"{100 * base['fraction_of_peak']:>8.1f}")
    for name, entry in results["stages"].items():
        for backend, item in entry["backends"].items():
            lines.append(f"{name + ' ' + backend:<34}{'x'.join(map(str, entry['input_size'])):>10}"
                         f"{entry['flops'] / 1e9:>9.2f}{item['seconds_median'] * 1e3:>12.1f}{item['gflops']:>10.1f}"
                         f"{100 * item['fraction_of_peak']:>8.1f}")
    lines.append("")
    cascade_info = results.get("cascade", {})
    if cascade_info:
        size = "x".join(map(str, cascade_info["image_size_hw"]))
        lines.append(f"whole cascade on {Path(cascade_info['image']).name} ({size}, {cascade_info['image_note']}):")
        for backend, item in cascade_info["backends"].items():
            steps = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in item["steps_seconds_median"].items()
                              if k in ("read", "preprocess", "stage1", "stage2", "write"))
            lines.append(f"  {backend:<12} {item['seconds_median'] * 1e3:8.1f} ms  = "
                         f"{item['ratio_to_baseline']:.2f} x baseline "
                         f"({item['baseline_seconds_median'] * 1e3:.0f} ms, interleaved)  peak RSS "
                         f"{item['peak_rss_bytes'] / 2**20:.0f} MiB  (ms: {steps})")
    if "memory_large" in results:
        mem = results["memory_large"]
        lines.append(f"peak RSS at {mem['size_hw'][0]}x{mem['size_hw'][1]} 16-bit ({mem['backend']}): "
                     f"{mem['peak_rss_bytes'] / 2**20:.0f} MiB (after imports "
                     f"{mem['rss_after_imports_bytes'] / 2**20:.0f}, after loading "
                     f"{mem['rss_after_load_bytes'] / 2**20:.0f}); cascade {mem['seconds_median'] * 1e3:.0f} ms")
    if "training" in results:
        train = results["training"]
        lines.append(f"stage-1 training step ({train['batch_size']} x {'x'.join(map(str, train['size_hw']))}): "
                     f"cached {train['cached_step_seconds'] * 1e3:.0f} ms/step")
        for workers, item in train["workers"].items():
            lines.append(f"  loader, {workers} worker(s): {item['loader_step_seconds'] * 1e3:.0f} ms/step vs cached "
                         f"{item['cached_step_seconds'] * 1e3:.0f} (interleaved), waiting "
                         f"{item['data_wait_seconds'] * 1e3:.0f} ms/step -> overhead {item['overhead_percent']:+.1f} %")
    lines += throughput.table_lines(results)
    lines.append("")
    if results.get("settings", {}).get("quick"):
        lines.append("targets: not judged (--quick uses tiny sizes and one repetition; its numbers mean nothing)")
        return "\n".join(lines)
    lines.append("targets:")
    for key, item in results.get("summary", {}).items():
        bound = f"<= {item['target_max']}" if "target_max" in item else f">= {item['target_min']}"
        stretch = (f"; stretch <= {item['stretch_max']} -> {'met' if item['stretch_met'] else 'missed'}"
                   if "stretch_max" in item else "")
        verdict = "met" if item["met"] else "MISSED"
        lines.append(f"  {key:<28} {item['value']:.3f} (target {bound}) -> {verdict}{stretch}")
    return "\n".join(lines)
