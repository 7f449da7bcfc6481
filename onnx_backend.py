"""Export stage checkpoints to ONNX and check their parity with PyTorch.

The command line lives in :mod:`mammo.cli.onnx_backend` (installed as ``mammo-onnx``
too); ``python onnx_backend.py --help`` lists its flags.
"""

import sys

from mammo.cli.onnx_backend import get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
