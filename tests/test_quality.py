"""The quality verdict: no real mammogram of ../shared/data is rejected, each constructed non-mammogram is, with a
reason that says what is wrong (issue 21)."""

from __future__ import annotations

import glob

import cv2
import numpy as np
import pytest

from mammo import imaging
from mammo.inference import quality

REAL_SETS = ("tissue/train_valid/fgt_seg/*.png", "lesion_cdd_cesm/images/*.jpg", "lesion_cdd_cesm_more/images/*.png",
             "csaw_s_dev/images/*.png", "vindr_density_dev/images/*.jpg", "nyu_16bit/images/*.png")


def test_no_real_image_is_rejected(shared_data):
    files = [path for pattern in REAL_SETS for path in sorted(glob.glob(str(shared_data / pattern), recursive=True))
             if "/masks/" not in path.replace("\\", "/")]
    assert len(files) == 455  # 60 film, 98 + 277 CDD-CESM, 6 CSAW-S, 12 VinDr, 2 NYU
    verdicts = {path: quality.image_verdict(imaging.read_image(path).pixels) for path in files}
    refused = {path: v.reasons for path, v in verdicts.items() if v.status != "ok"}
    assert not refused, refused


@pytest.fixture(scope="module")
def mammogram(shared_data) -> np.ndarray:
    return imaging.read_image(shared_data / "csaw_s_dev" / "images" / "002_0.png").pixels


def _screenshot(mammogram: np.ndarray, background: int) -> np.ndarray:
    """A viewer's window: a toolbar, the mammogram in the middle, a side panel of thumbnails."""
    canvas = np.full((1200, 1900), background, np.uint8)
    canvas[:50] = 70
    canvas[10:40, 20:600] = 230
    canvas[100:100 + mammogram.shape[0], 300:300 + mammogram.shape[1]] = mammogram
    for k in range(3):
        canvas[100 + 350 * k:400 + 350 * k, 1500:1800] = cv2.resize(mammogram, (300, 300))
    return canvas


@pytest.mark.parametrize("name, words", [
    ("black", "nearly uniform"), ("white", "nearly uniform"), ("one pixel", "1 x 1 px"), ("ten pixels", "10 x 10 px"),
    ("rotated", "turned by 90 degrees"), ("inverted", "negative image"), ("light screenshot", "no dark background"),
    ("dark screenshot", ""), ("noise", ""), ("strip", "ratio over"),
])
def test_constructed_non_mammograms_are_rejected(name, words, mammogram):
    cases = {
        "black": np.zeros((1024, 800), np.uint8), "white": np.full((1024, 800), 255, np.uint8),
        "one pixel": np.full((1, 1), 120, np.uint8), "ten pixels": np.full((10, 10), 120, np.uint8),
        "rotated": np.ascontiguousarray(np.rot90(mammogram)), "inverted": 255 - mammogram,
        "light screenshot": _screenshot(mammogram, 235), "dark screenshot": _screenshot(mammogram, 30),
        "noise": (np.random.default_rng(0).random((1024, 800)) * 255).astype(np.uint8),
        "strip": np.ascontiguousarray(mammogram[:, :300]),  # 1024 x 300 px: a side ratio of 3.4
    }
    verdict = quality.image_verdict(cases[name])
    assert verdict.status == "rejected", (name, verdict.reasons, verdict.measures)
    assert words in " ".join(verdict.reasons)


def test_the_worst_finding_decides_and_the_anatomy_change_warns(mammogram):
    verdict = quality.image_verdict(mammogram)
    assert verdict.status == "ok" and verdict.reasons == []
    quality.result_verdict(verdict, {"changed_fraction": 0.10})
    assert verdict.status == "ok"
    quality.result_verdict(verdict, {"changed_fraction": 0.45})
    assert verdict.status == "warning" and "changed 45%" in verdict.reasons[0]
    verdict.add("rejected", "x")
    verdict.add("warning", "y")
    assert verdict.status == "rejected" and verdict.to_dict()["reasons"][-2:] == ["x", "y"]
