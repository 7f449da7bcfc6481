"""Measure the cascade's speed and memory (training, inference, folder throughput).

The command line lives in :mod:`mammo.cli.benchmark` (installed as ``mammo-benchmark``
too); ``python benchmark.py --help`` lists its flags.
"""

import sys

try:
    from mammo.cli.benchmark import get_args_parser, main
except KeyboardInterrupt:  # Ctrl-C while PyTorch and the rest load: one line, as during the run
    print("interrupted: benchmark.py stopped while starting", file=sys.stderr)
    sys.exit(130)

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
