"""Class indices and names of both stages: the one place they are defined.

Stage 1 (tissue) follows the DDSM tissue-label set of Tiryaki & Kaplanoglu (IRBM 2022), whose label intensities
64 / 128 / 192 / 255 map to classes 0..3 (see ``imaging.TISSUE_LABEL_VALUES`` and ``../shared/data/README.md``).
Stage 2 (lesion) has one foreground class; its network outputs one logit per pixel (sigmoid, not softmax).
"""

from __future__ import annotations

#: Stage-1 class indices (index = class id in every tissue map of the suite).
BACKGROUND, ADIPOSE, FGT, PECTORAL = 0, 1, 2, 3
#: Stage-1 class names, index = class id (stored in every stage-1 checkpoint's ``class_names``).
TISSUE_CLASS_NAMES: tuple[str, ...] = ("background", "adipose", "fgt", "pectoral")
#: Stage-2 class names (stored in every stage-2 checkpoint's ``class_names``).
LESION_CLASS_NAMES: tuple[str, ...] = ("lesion",)
