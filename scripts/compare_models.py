"""Parameter counts and CPU forward latency of the ACA-ASPP ResUNet beside smp.Unet("resnet34").

Usage: ``python scripts/compare_models.py [--sizes 512x512 512x256] [--repeats 5] [--threads N]``

Prints a table; batch 1, one input channel, 4 classes, fp32 eager, ``torch.inference_mode``; the median of
``--repeats`` timed passes after two warm-up passes. Both models are measured in the same run, alternating, so load
from other processes affects them alike. The full benchmark of the suite (backends, cascade, loader) is benchmark.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import segmentation_models_pytorch as smp # noqa: E402

from mammo.cli import common  # noqa: E402
from mammo.nn.models import build_model, count_parameters, default_model_config  # noqa: E402


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.ArgumentParser(description=__doc__, add_help=add_help,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["512x512", "512x256"],
                        help="HxW input sizes (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per model and size (default %(default)s)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads (default %(default)s)")
    return parser


def _latency_ms(model: torch.nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x)
    return 1000 * (time.perf_counter() - start)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    contenders = {
        "ACAAtrousResUNet (resnet34)": build_model(default_model_config(classes=4)).eval(),
        'smp.Unet("resnet34")': smp.Unet("resnet34", encoder_weights=None, in_channels=1, classes=4).eval(),
    }
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, fp32 eager, median of {args.repeats}")
    print(f"{'model':32s} {'params':>12s} " + " ".join(f"{s + ' ms':>12s}" for s in args.sizes))
    times = {name: {} for name in contenders}
    with torch.inference_mode():
        for size in args.sizes:
            h, w = (int(v) for v in size.lower().split("x"))
            x = torch.rand(1, 1, h, w)
            for model in contenders.values():
                model(x), model(x)  # warm-up
            samples = {name: [] for name in contenders}
            for _ in range(args.repeats):
                for name, model in contenders.items():
                    samples[name].append(_latency_ms(model, x))
            for name in contenders:
                times[name][size] = statistics.median(samples[name])
    for name, model in contenders.items():
        print(f"{name:32s} {count_parameters(model):>12,d} " + " ".join(f"{times[name][s]:>12.1f}" for s in args.sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
