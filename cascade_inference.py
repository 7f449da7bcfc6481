"""Run the cascade on mammograms: tissue map, density, lesion probability, records.

The command line lives in :mod:`mammo.cli.infer` (installed as ``mammo-infer``
too); ``python cascade_inference.py --help`` lists its flags.
"""

import sys

try:
    from mammo.cli.infer import get_args_parser, main
except KeyboardInterrupt:  # Ctrl-C while PyTorch and the rest load: one line, as during the run
    print("interrupted: cascade_inference.py stopped while starting", file=sys.stderr)
    sys.exit(130)

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
