"""Speed and memory of the cascade on this machine, against a physical reference and a published-style baseline.

The command line only (the root ``benchmark.py`` is its face): the timers, the measurements, the targets and the
table are in ``mammo/bench/speed.py`` (and the whole-process folder measurements in ``mammo/bench/throughput.py``).
:func:`main` checks the flags (:func:`_usage_problem`), prepares the stages and runs the parts below in order
(``_measure_*``), then writes the JSON.

One run measures, on the CPU, with all cores this process may use (``--threads``):

1. the machine's fp32 matrix-multiply peak, GFLOP/s = 2 n^3 / t of ``torch.matmul`` on n x n fp32 matrices
   (the physical reference every network figure is compared with);
2. the FLOPs of each stage at its network size and of the baseline (``torch.utils.flop_counter.FlopCounterMode``:
   convolutions and matrix products, 2 FLOPs per multiply-add; element-wise ops are not counted);
3. the baseline: ``segmentation_models_pytorch.Unet("resnet34")``, 1 input channel, 4 classes, 512 x 512,
   PyTorch eager, batch 1 (a common U-Net anyone can rebuild);
4. each stage under PyTorch eager, PyTorch channels-last and ONNX Runtime
   (``mammo.weights.runners.make_runner``): latency and achieved GFLOP/s (stage FLOPs / latency) and its share of
   the matmul peak;
5. the whole cascade on a real full-field 16-bit mammogram (read the file, preprocess, stage 1, ROI, stage 2,
   outputs written by ``mammo.inference.outputs.write_outputs`` without the optional matplotlib figure), per
   backend, in a fresh subprocess each (so peak memory does not mix): latency, peak RSS, and the ratio to the
   baseline pass;
6. peak RSS of the whole cascade on a ``--large-size`` (default 4096 x 3328) 16-bit image, synthesised by
   upscaling the real one, in its own subprocess;
7. folder throughput (``mammo/bench/throughput.py``, issue 13): whole ``cascade_inference.py --image-dir``
   processes with every default output, under the default ``--backend`` and each explicit one
   (``--folder-backends``, default all that ``runners.BACKENDS`` holds besides ``auto``), on ``--folder-images``
   (N, default 12) and 2 copies of the cascade image (the checkpoints below, linked into a ``--checkpoint-dir``),
   interleaved with the plain single-network tool ``scripts/plain_segmenter.py`` (read, 8 bit,
   ``smp.Unet("resnet34")`` 512 x 512 eager, class map written at full size) on the same folders; ms per image =
   (t_N - t_2) / (N - 2) (start-up cancels out), the median of ``--folder-repeats`` rounds, the ratio to the plain
   tool and each process's own peak RSS; then the peak RSS of one ``cascade_inference.py --image`` process on a
   2944 x 1920 16-bit image (the cascade image, resized if it is another size) under ``--backend onnxruntime``.
   ``--skip-folder`` leaves both out;
8. a stage-1 training step (forward, TissueLoss, L1 penalty, backward, AdamW) fed by the training script's real
   data loader (``mammo.training.engine.make_loader`` over ``mammo.training.datasets.TissueDataset`` with the
   training augmentation; ``--workers``) vs the same steps on batches already in memory: the loader's overhead in
   percent.

Every timing is the median of ``--repeats`` runs after ``--warmup`` runs (training: the median step time over
``--train-steps`` steps after one warm-up step; folder throughput: the median over ``--folder-repeats`` rounds after
one untimed round). The table is printed and everything is written to ``--output`` as JSON, with the targets of
the project issue and whether each was met. Stage checkpoints come from ``--stage1-weights`` / ``--stage2-weights``;
without them, the shipped default model (``weights/stageN.safetensors``,
``mammo.weights.release.default_weights``: what ``cascade_inference.py`` runs when given no weights), or, with
``--quick``, with ``--stage1-size`` / ``--stage2-size`` or where no shipped model exists, untrained models at those
sizes (default 512 x 512 and 384 x 384, the training script's defaults;
``--stage1-size 512 256 --stage2-size 256 256`` gives the README's real-data run). The JSON says which (speed does
not depend on the weights, only on the network sizes).

Other processes on the machine slow every figure down; the JSON records the load average before and after.
``--quick`` runs everything at tiny sizes once (for the tests; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mammo.cli import common
from mammo.core import fileio
from mammo import imaging
from mammo.weights import release
from mammo.weights import onnx_export
from mammo.weights import runners
from mammo.bench import speed
from mammo.bench import throughput
from mammo.cascade import checks


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the benchmark (see the module docstring)."""
    parser = common.ArgumentParser(description="Benchmark the cascade's speed and memory on this machine.",
                                   add_help=add_help, parents=[common.runtime_parser("threads")])
    parser.add_argument("--output", type=str, default="benchmark.json",
                        help="JSON results file (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one repetition (a smoke test; numbers mean nothing)")
    parser.add_argument("--image", type=str, default=None,
                        help=f"16-bit full-field mammogram for the cascade (default: {speed.DEFAULT_IMAGE} if "
                             "present, else a synthetic 16-bit image)")
    parser.add_argument("--large-size", type=int, nargs=2, default=list(speed.LARGE_SIZE), metavar=("H", "W"),
                        help="size of the synthetic 16-bit image of the memory test, pixels (default: %(default)s)")
    parser.add_argument("--stage1-weights", type=str, default=None,
                        help="stage-1 checkpoint or model file (default: the shipped model, else untrained)")
    parser.add_argument("--stage2-weights", type=str, default=None,
                        help="stage-2 checkpoint or model file (default: the shipped model, else untrained)")
    parser.add_argument("--stage1-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="measure an untrained stage 1 of this network size, pixels, instead of the shipped model "
                             f"(default without a shipped model: {list(speed.DEFAULT_STAGE1_SIZE)})")
    parser.add_argument("--stage2-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="measure an untrained stage 2 of this network size, pixels, instead of the shipped model "
                             f"(default without a shipped model: {list(speed.DEFAULT_STAGE2_SIZE)})")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repetitions per measurement (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed warm-up runs per measurement (default: %(default)s)")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="n of the n x n fp32 matmul (default: %(default)s)")
    parser.add_argument("--tissue-dir", type=str, default=None,
                        help=f"tissue images for the loader test (folder or CSV; default: {speed.DEFAULT_TISSUE_DIR} "
                             "if present, else synthetic)")
    parser.add_argument("--train-steps", type=int, default=5, help="timed training steps (default: %(default)s)")
    parser.add_argument("--train-batch-size", type=int, default=4, help="training batch size (default: %(default)s)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts to measure (default: %(default)s)")
    parser.add_argument("--cascade-backends", nargs="+", default=["torch", "onnxruntime"],
                        choices=("torch", "onnxruntime"),
                        help="backends of the whole-cascade test (default: %(default)s)")
    parser.add_argument("--skip-training", action="store_true", help="leave out the training-step measurement")
    parser.add_argument("--folder-images", type=int, default=None,
                        help=f"N, images of the large folder of the folder-throughput test, at least "
                             f"{throughput.MIN_FOLDER_IMAGES} (default: {throughput.DEFAULT_FOLDER_IMAGES}; "
                             f"{throughput.QUICK['folder_images']} with --quick)")
    parser.add_argument("--folder-repeats", type=int, default=throughput.DEFAULT_FOLDER_REPEATS,
                        help="timed rounds of the folder-throughput test (default: %(default)s; 1 with --quick)")
    parser.add_argument("--folder-backends", nargs="*", default=None, choices=throughput.explicit_backends(),
                        help="explicit --backend values measured beside the default one in the folder test (default: "
                             "every one cascade_inference.py takes, now %s)" % " ".join(throughput.explicit_backends()))
    parser.add_argument("--skip-folder", action="store_true",
                        help="leave out the folder-throughput test and the ONNX Runtime whole-process memory test")
    return parser


def stage_weights(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The model file each stage is measured with: ``--stageN-weights``; else the shipped model
    (``release.default_weights``) when it exists and neither ``--quick`` nor ``--stageN-size`` asks for an
    untrained network; else None (an untrained network, ``speed.prepare_stages``)."""
    chosen = []
    for stage in (1, 2):
        given, size = getattr(args, f"stage{stage}_weights"), getattr(args, f"stage{stage}_size")
        shipped = release.default_weights(stage)
        if not given and not args.quick and size is None and shipped.is_file():
            given = str(shipped)
        chosen.append(given)
    return chosen[0], chosen[1]


@dataclass(frozen=True)
class _Run:
    """Settings every measurement of one run shares (``--quick`` already applied)."""

    quick: bool
    threads: int  # torch threads and OMP_NUM_THREADS of the child processes
    repeats: int  # timed repetitions per measurement
    warmup: int  # untimed runs before them
    work: Path  # the run's scratch folder (removed at the end)


def _folder_images(args: argparse.Namespace) -> int:
    """N of the folder-throughput test: ``--folder-images``, else the default (``--quick``: the quick one)."""
    if args.folder_images is not None:
        return args.folder_images
    return throughput.QUICK["folder_images"] if args.quick else throughput.DEFAULT_FOLDER_IMAGES


def _usage_problem(args: argparse.Namespace) -> str | None:
    """The first bad-usage message, from the cheap checks before minutes of measuring (the output file, every
    given path, the checkpoints' stages, the image, ``--folder-images``), else None."""
    output = Path(args.output)
    if output.is_dir():
        return f"--output {output} is a folder; pass a file name (e.g. {output / 'benchmark.json'})"
    if output.exists() and not args.overwrite:
        return f"{output} exists; pass --overwrite or choose another --output"
    for flag, value in (("--image", args.image), ("--stage1-weights", args.stage1_weights),
                        ("--stage2-weights", args.stage2_weights), ("--tissue-dir", args.tissue_dir)):
        if value and not Path(value).exists():
            return f"{flag} {value} not found; pass an existing path or leave the flag out for the default"
    try:
        checks.writable_folder(output.parent, f"--output {output}: the folder")
        for stage in (1, 2):
            weights = getattr(args, f"stage{stage}_weights")
            if weights:
                checks.load_stage_checkpoint(weights, f"--stage{stage}-weights", stage)
        if args.image:
            imaging.read_image(args.image)
    except (checks.UserInputError, imaging.ImageReadError, ValueError) as error:
        return checks.one_line(error)
    folder_images = _folder_images(args)
    least = throughput.SMALL_FOLDER_IMAGES + 1 if args.quick else throughput.MIN_FOLDER_IMAGES
    if folder_images < least:
        return (f"--folder-images {folder_images}: at least {least} images are needed"
                + ("" if args.quick else " (issue 13; fewer only with --quick)"))
    return None


def _measure_networks(args: argparse.Namespace, run: _Run, stage_checkpoints: dict, results: dict) -> None:
    """The matmul reference, the baseline and every stage x backend, timed round-robin (one machine load for all):
    ``results["matmul"]``, ``["baseline"]`` set, ``["stages"][name]`` updated."""
    print("networks (matmul, baseline, stages x backends, interleaved) ...", file=sys.stderr)
    base_size = speed.QUICK["baseline_size"] if run.quick else speed.BASELINE_SIZE
    matmul_n = speed.QUICK["matmul_size"] if run.quick else args.matmul_size
    networks = speed.measure_networks(stage_checkpoints, base_size, matmul_n, run.repeats, run.warmup, run.threads)
    results["matmul"], results["baseline"] = networks["matmul"], networks["baseline"]
    for name, entry in networks["stages"].items():
        results["stages"][name].update(entry)


def _measure_cascade(args: argparse.Namespace, run: _Run, image: Path, weights: dict[str, dict],
                     results: dict) -> None:
    """The whole cascade on ``image``, per ``--cascade-backends``, each in a fresh process
    (``results["cascade"]["backends"]``); then the peak memory on the ``--large-size`` image with the fastest
    backend (``results["memory_large"]``). ``weights``: backend -> {"stage1", "stage2"} model files."""
    base_size = speed.QUICK["baseline_size"] if run.quick else speed.BASELINE_SIZE
    for backend in args.cascade_backends:
        print(f"cascade ({backend}) ...", file=sys.stderr)
        child = speed.run_child({"kind": "cascade", "backend": backend, "threads": run.threads,
                                 "stage1": str(weights[backend]["stage1"]),
                                 "stage2": str(weights[backend]["stage2"]),
                                 "image": str(image), "repeats": run.repeats, "warmup": run.warmup,
                                 "baseline_size": list(base_size)})
        results["cascade"]["backends"][backend] = child

    large_size = tuple(speed.QUICK["large_size"]) if run.quick else tuple(args.large_size)
    cascade_runs = results["cascade"]["backends"]
    best_backend = min(cascade_runs, key=lambda b: cascade_runs[b]["seconds_median"])
    print(f"memory at {large_size[0]}x{large_size[1]} ({best_backend}) ...", file=sys.stderr)
    large = speed.large_image(image, large_size, run.work)
    child = speed.run_child({"kind": "cascade", "backend": best_backend, "threads": run.threads,
                             "stage1": str(weights[best_backend]["stage1"]),
                             "stage2": str(weights[best_backend]["stage2"]),
                             "image": str(large), "repeats": 1, "warmup": 0})
    results["memory_large"] = {"size_hw": list(large_size), "backend": best_backend,
                               "image_note": "the cascade image upscaled (linear), 16-bit PNG", **child}


def _measure_folder(args: argparse.Namespace, run: _Run, image: Path, image_note: str, paths: dict[str, Path],
                    results: dict) -> None:
    """Folder throughput of whole processes against the plain tool, then the peak RSS of one ``--image`` process
    under ONNX Runtime: ``results["folder_throughput"]``."""
    folder_images = _folder_images(args)
    print(f"folder throughput ({folder_images} and {throughput.SMALL_FOLDER_IMAGES} images, whole processes, "
          "interleaved with the plain tool) ...", file=sys.stderr)
    folder_repeats = throughput.QUICK["repeats"] if run.quick else args.folder_repeats
    plain_size = throughput.QUICK["plain_size"] if run.quick else throughput.PLAIN_SIZE
    folder = throughput.measure_folder_throughput(
        image, paths, run.work, n=folder_images, repeats=folder_repeats, threads=run.threads, plain_size=plain_size,
        warmup=not run.quick, backends=args.folder_backends)
    results["folder_throughput"] = folder
    folder["image_note"] = image_note
    folder["stage_input_sizes"] = {name: results["stages"][name]["input_size"] for name in ("stage1", "stage2")}
    print("peak RSS of one --image process (onnxruntime) ...", file=sys.stderr)
    memory_input = image  # 2944 x 1920 by default; with --quick the tiny image
    if not run.quick and tuple(results["cascade"]["image_size_hw"]) != throughput.MEMORY_IMAGE_SIZE:
        memory_input = speed.large_image(image, throughput.MEMORY_IMAGE_SIZE, run.work)
    folder["memory_onnxruntime"] = throughput.measure_memory(
        memory_input, paths, run.work, backend="onnxruntime", threads=run.threads, warmup=not run.quick)


def _measure_training(args: argparse.Namespace, run: _Run, stage_checkpoints: dict, results: dict) -> None:
    """A stage-1 training step with the real loader vs batches in memory: ``results["training"]``."""
    print("training step with the real loader ...", file=sys.stderr)
    tissue = args.tissue_dir or (str(speed.DEFAULT_TISSUE_DIR) if speed.DEFAULT_TISSUE_DIR.is_dir() else None)
    train_size = tuple(int(v) for v in stage_checkpoints["stage1"]["input_size"])
    results["training"] = speed.measure_training(
        tissue, train_size, speed.QUICK["train_batch_size"] if run.quick else args.train_batch_size,
        speed.QUICK["train_steps"] if run.quick else args.train_steps,
        speed.QUICK["workers"] if run.quick else args.workers)
    results["training"]["data"] = tissue or "synthetic tissue set"


def _measure_all(args: argparse.Namespace, run: _Run, paths: dict[str, Path], stage_checkpoints: dict,
                 results: dict) -> None:
    """Every measurement after the stages are prepared (``speed.prepare_stages``: their model files ``paths`` and
    checkpoints), in order, into ``results``."""
    _measure_networks(args, run, stage_checkpoints, results)

    image, image_note = speed.cascade_image(args.image, run.work, run.quick)
    shape = imaging.read_image(image).pixels.shape
    results["cascade"] = {"image": str(image), "image_note": image_note, "image_size_hw": list(shape),
                          "steps": "read + preprocess + stage 1 + ROI + stage 2 + outputs written "
                                   "(outputs.write_outputs, no matplotlib figure)",
                          "backends": {}}
    # ONNX Runtime runs the exported .onnx files, as deployed (export once; no PyTorch model is built)
    weights = {"torch": paths}
    if "onnxruntime" in args.cascade_backends:
        weights["onnxruntime"] = {name: onnx_export.export_onnx(stage_checkpoints[name], run.work / f"{name}.onnx")
                                  for name in stage_checkpoints}
    _measure_cascade(args, run, image, weights, results)
    if not args.skip_folder:
        _measure_folder(args, run, image, image_note, paths, results)
    if not args.skip_training:
        _measure_training(args, run, stage_checkpoints, results)


@common.interruptible("benchmark.py", "nothing was written, run it again")
def main(args: argparse.Namespace | None = None) -> int:
    """Run the benchmark, print the table and write the JSON; returns 0, or 2 for bad arguments / an existing output."""
    args = get_args_parser().parse_args() if args is None else args
    problem = _usage_problem(args)
    if problem:
        return common.usage_error(problem)
    quick = args.quick
    threads = int(args.threads or runners.available_cores())
    torch.set_num_threads(threads)
    repeats, warmup = (speed.QUICK["repeats"], speed.QUICK["warmup"]) if quick else (args.repeats, args.warmup)
    results: dict = {
        "machine": speed.machine_info(threads),
        "settings": {"quick": quick, "repeats": repeats, "warmup": warmup, "statistic": "median after warm-up"},
        "targets": dict(speed.TARGETS),
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="benchmark_") as folder:
        run = _Run(quick, threads, repeats, warmup, Path(folder))
        try:
            paths, stage_checkpoints, results["stages"] = speed.prepare_stages(
                stage_weights(args), (args.stage1_size or speed.DEFAULT_STAGE1_SIZE,
                                      args.stage2_size or speed.DEFAULT_STAGE2_SIZE), run.work, quick)
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        _measure_all(args, run, paths, stage_checkpoints, results)

    results["machine"]["load_average_end"] = speed.load_average()
    results["wall_seconds"] = time.perf_counter() - started
    results["summary"] = speed.summarize(results)
    output = Path(args.output)
    fileio.atomic_write_text(output, json.dumps(results, indent=2) + "\n")
    print(speed.format_table(results))
    print(f"results written to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
