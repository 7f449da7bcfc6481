"""Export stage checkpoints to ONNX and check their parity with PyTorch.

The command line lives in :mod:`mammo.cli.onnx_backend` (installed as ``mammo-onnx``
too); ``python onnx_backend.py --help`` lists its flags.
"""

import sys

try:
    from mammo.cli.onnx_backend import get_args_parser, main
except KeyboardInterrupt:  # Ctrl-C while PyTorch and the rest load: one line, as during the run
    print("interrupted: onnx_backend.py stopped while starting", file=sys.stderr)
    sys.exit(130)

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
