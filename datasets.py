"""Tissue and lesion datasets, augmentation presets, patient ids and patient-level splits: the design card's
``datasets.py``.

Two halves live in the package: :mod:`mammo.training.datasets` (the torch datasets and albumentations presets) and
:mod:`mammo.data.splits` (patient ids, table readers and splits, no torch). ``pip install`` gives the package only,
so this name never shadows the Hugging Face ``datasets`` package; this file re-exports both halves for code run from
the project root.
"""

from mammo.data.splits import *  # noqa: F401,F403
from mammo.data.splits import __all__ as _split_names
from mammo.training.datasets import *  # noqa: F401,F403
from mammo.training.datasets import __all__ as _torch_names

__all__ = list(_split_names) + list(_torch_names)
