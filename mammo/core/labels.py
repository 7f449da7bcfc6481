"""Class indices and names of both stages, and the mask names of the CSAW-S label files: the one place they are
defined.

Stage 1 (tissue) follows the DDSM tissue-label set of Tiryaki & Kaplanoglu (IRBM 2022), whose label intensities
64 / 128 / 192 / 255 map to classes 0..3 (see ``imaging.TISSUE_LABEL_VALUES`` and ``../shared/data/README.md``).
Stage 2 (lesion) has one foreground class; its network outputs one logit per pixel (sigmoid, not softmax).
"""

from __future__ import annotations

from pathlib import Path

#: Stage-1 class indices (index = class id in every tissue map of the suite).
BACKGROUND, ADIPOSE, FGT, PECTORAL = 0, 1, 2, 3
#: Stage-1 class names, index = class id (stored in every stage-1 checkpoint's ``class_names``).
TISSUE_CLASS_NAMES: tuple[str, ...] = ("background", "adipose", "fgt", "pectoral")
#: Stage-2 class names (stored in every stage-2 checkpoint's ``class_names``).
LESION_CLASS_NAMES: tuple[str, ...] = ("lesion",)

#: Partial-label codes in stage-1 class maps, for images labelled for some classes only (our extension; used for
#: CSAW-S, whose masks give the pectoral muscle and the glandular *region* but not the dense-tissue pixels).
#: ``ADIPOSE_OR_FGT``: breast tissue whose density is unknown (adipose or FGT, not background or pectoral): the loss
#: asks only that ``p(adipose) + p(FGT)`` be high there (a marginal loss, Shi et al., "Marginal loss and exclusion
#: loss for partially supervised multi-organ segmentation", Med Image Anal 2021). ``IGNORE``: unlabelled pixels
#: (burned-in text, the nipple, a band along an estimated edge), which take no part in the loss or the metrics.
ADIPOSE_OR_FGT = 4
IGNORE = 255
#: Label-file intensities of the partial codes (beside the DDSM intensities 64/128/192/255 of classes 0..3).
PARTIAL_LABEL_VALUES: dict[int, int] = {160: ADIPOSE_OR_FGT, 32: IGNORE}

#: Mask names of CSAW-S (Matsoukas et al. 2020; the dataset's label files, ``../shared/data/README.md``): one 0/255 PNG
#: per image and name, ``masks/<image stem>_<name>.png`` (:func:`csaw_mask_path`).
CSAW_MASKS: tuple[str, ...] = ("pectoral_muscle", "mammary_gland", "cancer", "nipple", "text")


def csaw_mask_path(masks_dir: str | Path, image_stem: str, name: str) -> Path:
    """The CSAW-S mask file ``name`` (one of :data:`CSAW_MASKS`) of the image ``image_stem`` in ``masks_dir``; it may
    not exist (callers decide what a missing mask means).

    Raises:
        ValueError: ``name`` is not one of :data:`CSAW_MASKS`.
    """
    if name not in CSAW_MASKS:
        raise ValueError(f"unknown CSAW-S mask name {name!r}; expected one of {CSAW_MASKS}")
    return Path(masks_dir) / f"{image_stem}_{name}.png"
