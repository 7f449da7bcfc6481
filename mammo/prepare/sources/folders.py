"""Folder sources: the DDSM tissue-label set, and ``images/`` + ``masks/`` lesion folders (CDD-CESM and others).

- Tissue set (Tiryaki & Kaplanoglu, :func:`tissue_samples`): ``<name>.png`` pairs with ``<name>_LI.png``; a label
  with values other than 64/128/192/255 or a size different from its image is skipped and reported.
  ``A_0002_1.RIGHT_MLO`` gives patient ``A_0002``.
- Lesion folders (:func:`lesion_dir_samples`): images and masks paired by stem; see that function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mammo import imaging
from mammo.prepare.sources.common import (CDD_NAME, IMAGE_SUFFIXES, TISSUE_LABEL_INTENSITIES, Built, Report, Sample,
                                          SkipSample, fit_mask, parse_image_name, safe_name)


def _find_by_stem(folder: Path) -> dict[str, Path]:
    """Image files (:data:`IMAGE_SUFFIXES`, not hidden) directly in ``folder`` by stem; sorted, first one wins."""
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Tissue-label set
# ----------------------------------------------------------------------------------------------------------------
def tissue_folders(root: Path) -> list[Path]:
    """Every ``fgt_seg/`` folder at or below ``root`` that has a sibling ``fgt_seg_labels/``, sorted."""
    return sorted(d for d in [root, *root.rglob("fgt_seg")] if d.name == "fgt_seg" and d.is_dir()
                  and (d.parent / "fgt_seg_labels").is_dir())


def tissue_samples(root: Path, source: str, report: Report) -> list[Sample]:
    """Samples of a tissue-label folder: every ``fgt_seg/<name>`` with ``fgt_seg_labels/<name>_LI`` below ``root``.

    Images under a folder named ``test`` (below ``root``) get split "test".
    """
    samples: list[Sample] = []
    seg_dirs = tissue_folders(root)
    if not seg_dirs:
        report.error(f"tissue folder {root}: no fgt_seg/ with a sibling fgt_seg_labels/ found below it "
                     "(expected the layout of tiryakiv/Mammogram-segmentation segmentation_data/...)")
        return samples
    for seg in seg_dirs:
        labels = _find_by_stem(seg.parent / "fgt_seg_labels")
        is_test = "test" in [p.lower() for p in seg.relative_to(root).parts] if seg != root else False
        for stem, image_path in _find_by_stem(seg).items():
            label_path = labels.get(f"{stem}_LI")
            item = str(image_path.relative_to(root))
            if label_path is None:
                report.skip(source, item, f"no label file {stem}_LI.* in {seg.parent / 'fgt_seg_labels'}")
                continue
            meta = parse_image_name(stem)
            row = {"patient_id": meta["patient_id"], "laterality": meta["laterality"], "view": meta["view"],
                   "split": "test" if is_test else "", "original_name": item}

            def build(image_path=image_path, label_path=label_path) -> Built:
                img = imaging.read_image(image_path)
                lab = imaging.read_image(label_path).pixels
                if lab.dtype != np.uint8:
                    raise SkipSample(f"label {label_path.name} is 16-bit; expected 8-bit 64/128/192/255")
                stray = np.setdiff1d(np.unique(lab), TISSUE_LABEL_INTENSITIES)
                if stray.size:
                    raise SkipSample(f"label {label_path.name} holds values {stray[:10].tolist()} besides "
                                     f"{list(TISSUE_LABEL_INTENSITIES)} (saved as JPEG or resized with "
                                     "interpolation?)")
                if lab.shape != img.pixels.shape:
                    raise SkipSample(f"label {label_path.name} is {lab.shape[1]}x{lab.shape[0]} but the image is "
                                     f"{img.pixels.shape[1]}x{img.pixels.shape[0]} (WxH)")
                return Built(image=img.pixels, label=lab)

            samples.append(Sample("tissue", source, safe_name(stem), item, row, [image_path, label_path], build))
    return samples


# ----------------------------------------------------------------------------------------------------------------
# images/ + masks/ pair folders (CDD-CESM and others)
# ----------------------------------------------------------------------------------------------------------------
def pair_folders(root: Path) -> list[Path]:
    """Every folder at or below ``root`` that holds both ``images/`` and ``masks/``, sorted."""
    return sorted(d for d in [root, *root.rglob("*")] if d.is_dir() and (d / "images").is_dir()
                  and (d / "masks").is_dir())


def lesion_dir_samples(root: Path, report: Report, tolerance: float) -> list[Sample]:
    """Samples of every ``images/`` + ``masks/`` pair folder at or below ``root``.

    A mask belongs to an image when its stem equals the image's stem, or (when there is no such mask) starts with
    the image's stem + ``_`` (``0_R-CC_benign.png``; a ``benign`` / ``malignant`` suffix gives the pathology).
    JPEG masks are thresholded at > 127 (``imaging.read_mask``). An image without a mask is reported and
    skipped; a mask that is all zero makes a lesion-free sample. The source is "cdd-cesm" when the names
    follow CDD-CESM's pattern, else the name of ``root``. Pairs under a sub-folder named ``test`` get split
    "test".
    """
    samples: list[Sample] = []
    pairs = pair_folders(root)
    if not pairs:
        report.error(f"lesion folder {root}: no images/ + masks/ sub-folders found")
        return samples
    for folder in pairs:
        images = _find_by_stem(folder / "images")
        masks = _find_by_stem(folder / "masks")
        cdd = sum(bool(CDD_NAME.match(s)) for s in images)
        source = "cdd-cesm" if images and cdd >= len(images) / 2 else safe_name(root.resolve().name.lower())
        is_test = folder != root and "test" in [p.lower() for p in folder.relative_to(root).parts]
        for stem, image_path in images.items():
            item = str(image_path.relative_to(root))
            mask_paths = [masks[stem]] if stem in masks else [
                m for s, m in masks.items() if s.startswith(stem + "_") and s not in images]
            if not mask_paths:
                report.skip(source, item, f"no mask {stem}.* (or {stem}_*.*) in {folder / 'masks'}")
                continue
            meta = parse_image_name(stem)
            suffixes = {m.stem[len(stem):].lower() for m in mask_paths}
            pathology = ("MALIGNANT" if any("malignant" in s for s in suffixes) else
                         "BENIGN" if any("benign" in s for s in suffixes) else "")
            row = {"patient_id": meta["patient_id"], "laterality": meta["laterality"], "view": meta["view"],
                   "acquisition": meta["acquisition"], "augmentation": meta["augmentation"],
                   "pathology": pathology, "abnormality": "", "split": "test" if is_test else "",
                   "original_name": item}

            def build(image_path=image_path, mask_paths=mask_paths) -> Built:
                img = imaging.read_image(image_path)
                merged = np.zeros(img.pixels.shape, bool)
                notes, n_marked = [], 0
                for mp in mask_paths:
                    m, note = fit_mask(imaging.read_mask(mp, "binary"), img.pixels.shape, tolerance, mp.name)
                    merged |= m
                    n_marked += int(m.any())
                    notes += [note] if note else []
                return Built(image=img.pixels, label=merged if merged.any() else None, notes=notes,
                             n_masks=n_marked)

            samples.append(Sample("lesion", source, safe_name(stem), item, row,
                                  [image_path, *mask_paths], build, params=f"tol={tolerance}"))
    return samples
