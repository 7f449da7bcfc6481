"""The ACA-ASPP ResUNet and its registry: the design card's ``models.py``.

The networks live in :mod:`mammo.nn.models` (the package is what ``pip install`` gives, without claiming the
top-level name ``models``); this file re-exports them for scripts and notebooks run from the project root.
"""

from mammo.nn.models import *  # noqa: F401,F403
