"""The tissue and lesion losses: the design card's ``losses.py``.

They live in :mod:`mammo.nn.losses`; this file re-exports them for code run from the project root.
"""

from mammo.nn.losses import *  # noqa: F401,F403
