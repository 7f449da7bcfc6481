"""Measure the cascade's speed and memory (training, inference, folder throughput).

The command line lives in :mod:`mammo.cli.benchmark` (installed as ``mammo-benchmark``
too); ``python benchmark.py --help`` lists its flags.
"""

import sys

from mammo.cli.benchmark import get_args_parser, main

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
