"""Build a training workspace from public mammography datasets or image/mask folders.

The command line lives in :mod:`mammo.cli.prepare` (installed as ``mammo-prepare``
too); ``python prepare_to_train.py --help`` lists its flags.
"""

import sys

try:
    from mammo.cli.prepare import get_args_parser, main
except KeyboardInterrupt:  # Ctrl-C while PyTorch and the rest load: one line, as during the run
    print("interrupted: prepare_to_train.py stopped while starting", file=sys.stderr)
    sys.exit(130)

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
