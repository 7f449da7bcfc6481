"""The same mammogram at another resolution gives the same density (issue 19 item 4): the working scale resizes every
input so that the breast is 960 px high before preprocessing, and stage 1's probabilities are resized back.

Measured with the shipped model on ``csaw_s_dev/images/002_0.png`` (1024 px high) resized to 384, 768 and 1536 px:
dense-pixel percent density 14.09 / 12.97 / 12.80 / 12.80 % (384 / 768 / 1024 / 1536), within 1.3 points of the
original. Before the working scale the FGT-region percent ran 33.5 / 26.2 / 25.7 / 25.1 %.
"""

from __future__ import annotations

import cv2
import pytest

from mammo import imaging
from mammo.cascade import load
from mammo.inference import record
from mammo.weights import release


@pytest.fixture(scope="module")
def shipped():
    if not (release.default_weights(1).is_file() and release.default_weights(2).is_file()):
        pytest.skip("the shipped model (weights/stage1.safetensors, stage2.safetensors) is not in this checkout")
    return load.load_cascade(release.default_weights(1), release.default_weights(2), device="cpu",
                             backend="onnxruntime", threads=2)


def _density(loaded, pixels) -> dict:
    result = loaded.cascade(pixels, name="002_0.png")
    return record.density_summary(result.tissue_classes, result.dense_tissue)


def test_density_within_2_points_at_384_768_and_1536_px(shipped, shared_data):
    pixels = imaging.read_image(shared_data / "csaw_s_dev" / "images" / "002_0.png").pixels
    original = _density(shipped, pixels)
    assert 5 < original["dense_percent"] < 40  # a real breast's density, not an empty or full map
    for height in (384, 768, 1536):
        width = round(pixels.shape[1] * height / pixels.shape[0])
        flag = cv2.INTER_AREA if height < pixels.shape[0] else cv2.INTER_LINEAR
        resized = _density(shipped, cv2.resize(pixels, (width, height), interpolation=flag))
        assert abs(resized["dense_percent"] - original["dense_percent"]) <= 2.0, (height, resized, original)
        assert resized["dense_category"] == original["dense_category"]
