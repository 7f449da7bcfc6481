"""Choose the stage-2 ROI rule (``roi.RoiRule``) on training images: lesion coverage against box size, on a grid.

Stage 1 runs once per image (the cascade's own preprocessing and orientation normalisation); every rule of the grid
is then applied to the same tissue map. For each lesion set the script reports the pooled ROI lesion coverage (lesion
pixels inside the box / all lesion pixels), the per-image mean coverage, the share of images with a coverage of at
least 0.95, and the mean ROI box fraction (box area / area of the breast's bounding box, the breast being every
non-background pixel of stage 1's map). Choose the rule on a training split, report it on held-out images::

    .venv/bin/python scripts/roi_rule_search.py --stage1-weights checkpoints_v2/stage1/best_stage1.pth \\
        --lesion-csv workspace_v2/unified_segmentation_dataset.csv --split train --output roi_search.csv

Sets: ``--lesion-csv`` rows of ``--split`` (CDD-CESM: reported apart for DM and CM views), and any ``--lesion-dir
NAME=DIR:SUFFIX`` (``images/<stem>.*`` with ``masks/<stem><SUFFIX>``, e.g.
``csaw=../shared/data/csaw_s_dev:_cancer.png``).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mammo.cli import common  # noqa: E402
from mammo.data import splits  # noqa: E402
from mammo import imaging  # noqa: E402
from mammo.cascade import Cascade  # noqa: E402
from mammo.weights.checkpoints import load_checkpoint  # noqa: E402
from mammo.core.labels import BACKGROUND  # noqa: E402
from mammo.core.metrics import roi_box_fraction  # noqa: E402
from mammo.imaging.roi import RoiRule, fgt_roi_box  # noqa: E402
from mammo.prepare.sources.common import CDD_NAME  # noqa: E402

GRID = {"margin_fraction": (0.1, 0.2), "breast_margin_fraction": (0.0, 0.05, 0.1, 0.15),
        "min_fgt_fraction": (0.0, 0.002, 0.01), "clip_to_breast": (False, True)}


def _items(args: argparse.Namespace) -> list[tuple[str, Path, list[Path]]]:
    items = []
    if args.lesion_csv:
        table = splits.read_lesion_table(args.lesion_csv)
        if args.split:
            table = table[table["split"] == args.split]
        for image, masks in zip(table["image_file_path"], table["roi_mask_file_path"]):
            match = CDD_NAME.match(Path(image).stem)
            name = f"cdd-{match['acq'].lower()}" if match else "csv"
            paths = [Path(m) for m in str(masks).split(splits.MASK_PATH_SEPARATOR) if m.strip()]
            items.append((name, Path(image), paths))
    for spec in args.lesion_dir or []:
        name, _, rest = spec.partition("=")
        folder, _, suffix = rest.rpartition(":")
        for image in sorted(Path(folder, "images").iterdir()):
            mask = Path(folder, "masks", image.stem + suffix)
            if mask.is_file():
                items.append((name, image, [mask]))
    return items


def main() -> int:
    parser = common.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage1-weights", type=Path, required=True)
    parser.add_argument("--lesion-csv", type=Path, default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--lesion-dir", action="append", default=None, metavar="NAME=DIR:SUFFIX")
    parser.add_argument("--output", type=Path, default=None, help="CSV of every rule x set")
    args = parser.parse_args()
    cascade = Cascade(load_checkpoint(args.stage1_weights), None)
    maps = []
    for name, image, masks in _items(args):
        pixels = imaging.read_image(image).pixels
        lesion = np.zeros(pixels.shape, bool)
        for m in masks:
            mask = imaging.read_mask(m, "binary").astype(bool)
            if mask.shape == lesion.shape:
                lesion |= mask
        found = cascade.tissue_and_roi(pixels)
        if found.flipped:
            lesion = lesion[:, ::-1]
        if lesion.any():
            maps.append((name, image.stem, found.tissue_classes, lesion))
    print(f"{len(maps)} images with lesions: " + ", ".join(f"{n} {sum(m[0] == n for m in maps)}"
                                                           for n in sorted({m[0] for m in maps})))
    rows = []
    for values in itertools.product(*GRID.values()):
        rule = RoiRule(**dict(zip(GRID, values)))
        per_set: dict[str, list] = {}
        for name, _, classes, lesion in maps:
            box, source = fgt_roi_box(classes, rule=rule)
            inside, total = int(lesion[box.slices()].sum()), int(lesion.sum())
            per_set.setdefault(name, []).append((inside, total, roi_box_fraction(box, classes != BACKGROUND), source))
        for name, got in per_set.items():
            inside, total, fraction, source = zip(*got)
            cover = np.array(inside) / np.array(total)
            rows.append({**rule.to_dict(), "set": name, "images": len(got),
                         "coverage_pooled": sum(inside) / sum(total), "coverage_mean": float(cover.mean()),
                         "share_ge_0.95": float((cover >= 0.95).mean()), "box_fraction_mean": float(np.mean(fraction)),
                         "fgt_source": sum(s == "fgt" for s in source)})
    frame = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_rows", 500):
        print(frame.round(3).to_string(index=False))
    if args.output:
        frame.to_csv(args.output, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
