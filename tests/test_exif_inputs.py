"""A JPEG stored rotated with EXIF Orientation 6 and a lesion mask drawn on the image as displayed (issue 14): the
workspace pair made by prepare_to_train.py is aligned, and inference writes its outputs in the displayed orientation
with a note in the record."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mammo.cli import infer as ci
from mammo import imaging
from mammo.cli import prepare as ptt


@pytest.fixture()
def rotated_pair(lesion_dir, tmp_path):
    """images/rot.jpg stored turned 90 degrees counter-clockwise with EXIF Orientation 6, masks/rot.png drawn on the
    displayed image (the brightest 10 % of the breast), and the displayed image itself."""
    shown = imaging.read_image(lesion_dir / "images" / "P111_R_DM_MLO.jpg").pixels[:, :400]
    root = tmp_path / "lesions"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(shown, 1))).save(root / "images" / "rot.jpg", quality=98, exif=exif)
    mask = shown > np.percentile(shown, 90)
    imaging.write_png(root / "masks" / "rot.png", mask)
    return root, shown, mask


def test_prepared_pair_is_aligned(rotated_pair, tmp_path):
    root, shown, mask = rotated_pair
    workspace = tmp_path / "ws"
    assert ptt.main(ptt.get_args_parser().parse_args(["--lesion-dir", str(root), "--workspace", str(workspace)])) == 0
    row = pd.read_csv(workspace / "unified_segmentation_dataset.csv").iloc[0]
    image = imaging.read_image(workspace / row["image_file_path"]).pixels
    written = imaging.read_mask(workspace / row["roi_mask_file_path"]) > 0
    assert image.shape == shown.shape
    np.testing.assert_array_equal(written, mask)
    assert image[written].mean() == pytest.approx(shown[mask].mean(), abs=3.0)  # the mask lies on the bright tissue
    assert image[written].mean() > image[~written].mean() + 50


def test_inference_outputs_are_in_the_displayed_orientation(rotated_pair, checkpoint_dir, tmp_path):
    root, shown, _ = rotated_pair
    out = tmp_path / "out"
    argv = ["--checkpoint-dir", str(checkpoint_dir), "--device", "cpu", "--image", str(root / "images" / "rot.jpg"),
            "--output-dir", str(out), "--no-visualization"]
    assert ci.main(ci.get_args_parser().parse_args(argv)) == 0
    record = json.loads((out / "rot.json").read_text(encoding="utf-8"))
    assert (record["image_size"]["height"], record["image_size"]["width"]) == shown.shape
    assert any(note.startswith("EXIF Orientation 6") for note in record["input"]["notes"])
    for name in ("rot_tissue_seg.png", "rot_cancer_prob.png", "rot_fgt_mask.png"):
        assert imaging.read_image(out / name).pixels.shape == shown.shape, name
