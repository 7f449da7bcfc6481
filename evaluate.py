"""Score the cascade (or a folder of its outputs) against ground truth.

The command line lives in :mod:`mammo.cli.evaluate` (installed as ``mammo-evaluate``
too); ``python evaluate.py --help`` lists its flags.
"""

import sys

from mammo.cli.evaluate import get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
