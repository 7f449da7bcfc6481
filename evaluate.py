"""Score the cascade (or a folder of its outputs) against ground truth.

The command line lives in :mod:`mammo.cli.evaluate` (installed as ``mammo-evaluate``
too); ``python evaluate.py --help`` lists its flags.
"""

import sys

try:
    from mammo.cli.evaluate import get_args_parser, main
except KeyboardInterrupt:  # Ctrl-C while PyTorch and the rest load: one line, as during the run
    print("interrupted: evaluate.py stopped while starting", file=sys.stderr)
    sys.exit(130)

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
