"""Train the cascade: stage 1 (tissue) and stage 2 (lesions on stage-1 ROI crops).

The command line lives in :mod:`mammo.cli.train` (installed as ``mammo-train``
too); ``python cascade_segmentation_model.py --help`` lists its flags.
"""

import sys

try:
    from mammo.cli.train import get_args_parser, main
except KeyboardInterrupt:  # Ctrl-C while PyTorch and the rest load: one line, as during the run
    print("interrupted: cascade_segmentation_model.py stopped while starting", file=sys.stderr)
    sys.exit(130)

__all__ = ["get_args_parser", "main"]

if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
