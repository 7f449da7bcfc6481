"""Command line: export the cascade's stage checkpoints to ONNX and check PyTorch / ONNX Runtime parity.

The export and the parity check are ``onnx_export.py``; running an exported file (or a checkpoint) under ONNX Runtime is
``runners.py``. Usage::

    python onnx_backend.py --stage1-weights checkpoints/stage1/best_stage1.pth \\
        --stage2-weights checkpoints/stage2/best_stage2.pth --output-dir onnx/
"""

from __future__ import annotations

import argparse
import sys

from onnx_export import ONNX_OPSET, export_stages


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the ONNX export."""
    parser = argparse.ArgumentParser(description="Export the cascade's stage checkpoints to ONNX (dynamic batch).",
                                     add_help=add_help)
    parser.add_argument("--stage1-weights", type=str, default=None, help="stage-1 checkpoint (.pth) (default: %(default)s)")
    parser.add_argument("--stage2-weights", type=str, default=None, help="stage-2 checkpoint (.pth) (default: %(default)s)")
    parser.add_argument("--output-dir", type=str, required=True, help="folder for stage1.onnx / stage2.onnx")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset version (default: %(default)s)")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="leave height and width free too (default: fixed at the checkpoint's input size)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .onnx files")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the PyTorch vs ONNX Runtime logits comparison")
    return parser


def main(args: argparse.Namespace) -> int:
    """Export the given stage checkpoints to ONNX and check parity; returns 0, or 2 for bad input."""
    try:
        report = export_stages(args.stage1_weights, args.stage2_weights, args.output_dir, overwrite=args.overwrite,
                               dynamic_size=args.dynamic_size, opset=args.opset, check=args.check)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, item in report.items():
        diff = item["max_abs_logit_diff"]
        print(f"{name}: {item['path']}" + ("" if diff is None else f"  (max |logit diff| vs PyTorch: {diff:.2e})"))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
