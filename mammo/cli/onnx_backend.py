"""Command line: export the cascade's stage checkpoints to ONNX and check PyTorch / ONNX Runtime parity.

The export is :mod:`mammo.weights.onnx_export`, the parity check :mod:`mammo.weights.export`; running an exported file
(or a checkpoint) under ONNX Runtime is :mod:`mammo.weights.runners`. Usage::

    python onnx_backend.py --stage1-weights checkpoints/stage1/best_stage1.pth \\
        --stage2-weights checkpoints/stage2/best_stage2.pth --output-dir onnx/
"""

from __future__ import annotations

import argparse
import sys

from mammo.cli import common
from mammo.cascade import checks
from mammo.weights.export import export_stages
from mammo.weights.onnx_export import ONNX_OPSET


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """Command-line flags of the ONNX export."""
    parser = common.ArgumentParser(description="Export the cascade's stage checkpoints to ONNX (dynamic batch).",
                                add_help=add_help)
    parser.add_argument("--stage1-weights", type=str, default=None,
                        help="stage-1 checkpoint (.pth) (default: %(default)s)")
    parser.add_argument("--stage2-weights", type=str, default=None,
                        help="stage-2 checkpoint (.pth) (default: %(default)s)")
    parser.add_argument("--output-dir", type=str, required=True, help="folder for stage1.onnx / stage2.onnx")
    parser.add_argument("--opset", type=int, default=ONNX_OPSET,
                        help="ONNX opset version, 9 to 20 (default: %(default)s)")
    parser.add_argument("--dynamic-size", action="store_true",
                        help="leave height and width free too (default: fixed at the checkpoint's input size)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing .onnx files")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the PyTorch vs ONNX Runtime logits comparison")
    return parser


#: Opsets accepted: 9 (opsets 7 and 8 cannot export the decoder's bilinear upsampling; measured with torch 2.14) to 20
#: (the newest the classic TorchScript exporter supports: torch.onnx's ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET).
OPSET_RANGE = (9, 20)


@common.interruptible("onnx_backend.py", "the .onnx files finished are kept, run it again with --overwrite to "
                       "export them all")
def main(args: argparse.Namespace | None = None) -> int:
    """Export the given stage checkpoints to ONNX and check parity; returns 0, or 2 for bad input (one line on
    stderr naming the file or flag: a missing file, a folder, a text file or image instead of a checkpoint,
    checkpoints of the wrong stages, an output folder that is a file, outputs that exist without ``--overwrite``,
    an opset out of range)."""
    args = get_args_parser().parse_args() if args is None else args
    try:
        checks.number(args.opset, "--opset", *OPSET_RANGE)
        if args.stage1_weights is None and args.stage2_weights is None:
            raise ValueError("nothing to export: pass --stage1-weights and/or --stage2-weights")
        output_dir = checks.writable_folder(args.output_dir, "--output-dir")
        for name, weights in (("stage1", args.stage1_weights), ("stage2", args.stage2_weights)):
            if weights is not None and (output_dir / f"{name}.onnx").exists() and not args.overwrite:
                raise FileExistsError(f"{output_dir / f'{name}.onnx'} exists; pass --overwrite or choose another "
                                      "--output-dir")
        checks.load_stage_pair(args.stage1_weights, args.stage2_weights)
        report = export_stages(args.stage1_weights, args.stage2_weights, args.output_dir, overwrite=args.overwrite,
                               dynamic_size=args.dynamic_size, opset=args.opset, check=args.check)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        return common.usage_error(checks.one_line(error))
    for name, item in report.items():
        diff = item["max_abs_logit_diff"]
        print(f"{name}: {item['path']}" + ("" if diff is None else f"  (max |logit diff| vs PyTorch: {diff:.2e})"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
