"""CSAW-S (Matsoukas et al., ICML 2020 workshop; Karolinska Institutet): digital mammograms with partial tissue labels.

The layout of ``../shared/data/csaw_s_dev``: ``images/<patient>_<view index>.png`` (8-bit, already contrast
processed) and ``masks/<stem>_<label>.png`` (0/255, the image's size) for ``pectoral_muscle``, ``mammary_gland``,
``cancer``, ``nipple`` and ``text``. The masks do not give dense-tissue (FGT) pixels: ``mammary_gland`` is the
glandular *region* the annotator drew, which holds FGT and fat. So each image becomes a *partial* stage-1 label map
(:func:`partial_tissue_label`), written with the DDSM intensities plus the partial codes of
``mammo.core.labels.PARTIAL_LABEL_VALUES``; ``mammo.nn.losses.TissueLoss`` trains on it with a marginal loss.

Split: a fixed patient split. The patients in ``holdout`` get split "test" (never trained on, kept for evaluation);
the others "train". The stage-1 validation split (which picks the best epoch) stays the screen-film set's.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mammo import imaging
from mammo.core.labels import CSAW_MASKS, csaw_mask_path
from mammo.prepare.sources.common import Built, Report, Sample, SkipSample, safe_name


#: Label-file intensities written (DDSM: imaging.TISSUE_LABEL_VALUES; partial: labels.PARTIAL_LABEL_VALUES).
_BACKGROUND, _ADIPOSE, _PECTORAL, _ADIPOSE_OR_FGT, _IGNORE = 64, 128, 255, 160, 32

#: Width of the unlabelled band along the estimated skin line, as a fraction of the image height (5 px at the
#: 1024 px of the CSAW-S copies): the breast outline comes from a threshold, not from the annotator.
EDGE_BAND_FRACTION = 0.005


def breast_region(image8: np.ndarray) -> np.ndarray:
    """The breast of an 8-bit mammogram: the largest connected region above :func:`imaging.breast_threshold` of the
    5x5 median-filtered image, holes filled.

    Args:
        image8: ``(H, W)`` uint8.

    Returns:
        ``(H, W)`` bool.
    """
    smooth = cv2.medianBlur(np.ascontiguousarray(image8), 5)
    above = (smooth > imaging.breast_threshold(smooth)).astype(np.uint8)
    count, components, stats, _ = cv2.connectedComponentsWithStats(above, connectivity=8)
    if count <= 1:
        return np.zeros(image8.shape, bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    region = (components == largest).astype(np.uint8)
    outside = np.pad(1 - region, 1, constant_values=1)
    cv2.floodFill(outside, None, (0, 0), 2)  # background reachable from the border
    return outside[1:-1, 1:-1] != 2


def partial_tissue_label(image8: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray:
    """A partial stage-1 label map of a CSAW-S image.

    Rule, later lines winning: background (64) outside :func:`breast_region`; adipose (128) in the breast; "adipose
    or FGT" (160) in the mammary-gland region and on the cancer; pectoral muscle (255); unlabelled (32) on the nipple,
    the burned-in text, and a band of :data:`EDGE_BAND_FRACTION` of the height on each side of the estimated skin
    line (outside the pectoral muscle). Outside the gland region the breast is subcutaneous and retromammary fat,
    hence adipose.

    Args:
        image8: ``(H, W)`` uint8 image.
        masks: the ``labels.CSAW_MASKS`` as ``(H, W)`` bool arrays (missing names count as empty).

    Returns:
        ``(H, W)`` uint8 label map with values in {32, 64, 128, 160, 255}.
    """
    empty = np.zeros(image8.shape, bool)
    get = lambda name: masks.get(name, empty)  # noqa: E731
    breast = breast_region(image8)
    label = np.full(image8.shape, _BACKGROUND, np.uint8)
    label[breast] = _ADIPOSE
    label[get("mammary_gland") | get("cancer")] = _ADIPOSE_OR_FGT
    label[get("pectoral_muscle")] = _PECTORAL
    band = max(1, int(round(EDGE_BAND_FRACTION * image8.shape[0])))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * band + 1, 2 * band + 1))
    edge = cv2.morphologyEx(breast.astype(np.uint8), cv2.MORPH_GRADIENT, kernel) > 0
    label[edge & ~get("pectoral_muscle")] = _IGNORE
    label[get("nipple") | get("text")] = _IGNORE
    return label


def patient_of(stem: str) -> str:
    """The CSAW-S patient id of an image stem: the part before the first ``_`` (``"002_1"`` -> ``"002"``), spelled as
    the file names spell it (leading zeros kept)."""
    return stem.split("_")[0]


def csaw_patients(root: Path) -> list[str]:
    """The patient ids of the PNG images in ``root / "images"`` (:func:`patient_of`), sorted; empty when there is
    no such folder."""
    images = root / "images"
    if not images.is_dir():
        return []
    return sorted({patient_of(p.stem) for p in images.iterdir() if p.suffix.lower() == ".png"})


def csaw_samples(root: Path, holdout: set[str], report: Report, source: str = "csaw-s") -> list[Sample]:
    """Samples of a CSAW-S folder (``images/`` + ``masks/``), with partial tissue labels.

    Args:
        root: the folder holding ``images/`` and ``masks/``.
        holdout: patient ids (the part of the stem before ``_``) whose images get split "test".
        report: where skipped images and errors go.
        source: the source name in the tissue table.

    Returns:
        One tissue :class:`Sample` per image that has all five masks (others are reported and skipped); rows carry
        ``patient_id``, ``view`` (MLO when the pectoral mask is not empty, else CC: CSAW-S names do not say) and
        ``split``.
    """
    images, masks = root / "images", root / "masks"
    if not images.is_dir() or not masks.is_dir():
        report.error(f"CSAW-S folder {root}: expected images/ and masks/ sub-folders")
        return []
    samples: list[Sample] = []
    for image_path in sorted(p for p in images.iterdir() if p.suffix.lower() == ".png"):
        stem = image_path.stem
        mask_paths = {name: csaw_mask_path(masks, stem, name) for name in CSAW_MASKS}
        missing = [p.name for p in mask_paths.values() if not p.is_file()]
        if missing:
            report.skip(source, image_path.name, f"missing mask(s) {', '.join(missing)} in {masks}")
            continue
        patient = patient_of(stem)
        try:
            view = "MLO" if imaging.read_mask(mask_paths["pectoral_muscle"], "binary").any() else "CC"
        except (imaging.ImageReadError, ValueError) as error:
            report.skip(source, image_path.name, str(error))
            continue
        row = {"patient_id": f"CSAW_{patient}", "laterality": "", "view": view,
               "split": "test" if patient in holdout else "train", "original_name": image_path.name}

        def build(image_path=image_path, mask_paths=mask_paths) -> Built:
            image = imaging.read_image(image_path).pixels
            if image.dtype != np.uint8:
                raise SkipSample(f"{image_path.name} is {image.dtype}; the CSAW-S copies are 8-bit PNGs")
            read = {name: imaging.read_mask(p, "binary").astype(bool) for name, p in mask_paths.items()}
            wrong = [p.name for name, p in mask_paths.items() if read[name].shape != image.shape]
            if wrong:
                raise SkipSample(f"mask(s) {', '.join(wrong)} do not match the image size {image.shape}")
            return Built(image=image, label=partial_tissue_label(image, read))

        samples.append(Sample("tissue", source, safe_name(stem), image_path.name, row,
                              [image_path, *mask_paths.values()], build, params=f"holdout={sorted(holdout)}"))
    return samples
