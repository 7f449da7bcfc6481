"""The anatomy rules on constructed stage-1 maps: each case is a map a network could produce and a radiologist would
reject, with the map the rules must turn it into, counted pixel by pixel."""

from __future__ import annotations

import numpy as np
import pytest

from mammo.cascade import anatomy
from mammo.core.labels import ADIPOSE, BACKGROUND, FGT, PECTORAL

H, W = 200, 120


def _probs(classes: np.ndarray, second: dict[int, int] | None = None) -> np.ndarray:
    """Softmax-like probabilities whose argmax is ``classes``: 0.7 on the class, 0.2 on ``second[class]`` (default
    adipose, or FGT for adipose pixels), 0.05 on the other two."""
    second = second or {}
    probs = np.full((4, *classes.shape), 0.05, np.float32)
    for cls in range(4):
        where = classes == cls
        runner_up = second.get(cls, FGT if cls == ADIPOSE else ADIPOSE)
        if runner_up == cls:
            runner_up = BACKGROUND
        probs[cls][where] = 0.7
        probs[runner_up][where] = 0.2
    return probs


def _breast() -> np.ndarray:
    """A half-disc breast against the chest wall (left), adipose, with an FGT core; 0 background elsewhere."""
    yy, xx = np.mgrid[:H, :W]
    classes = np.zeros((H, W), np.uint8)
    inside = ((yy - H / 2) / (H / 2 - 5)) ** 2 + (xx / (W - 10)) ** 2 <= 1
    classes[inside] = ADIPOSE
    classes[inside & ((yy - H / 2) ** 2 / 40 ** 2 + xx ** 2 / 50 ** 2 <= 1)] = FGT
    return classes


def test_view_from_dicom_then_name_then_image():
    classes = _breast()
    from_dicom = anatomy.view_of(classes, view_position="MLO", file_name="x_CC.png")
    assert from_dicom == anatomy.View("MLO", "dicom ViewPosition")
    assert anatomy.view_of(classes, file_name="P105_R_CM_MLO.jpg") == anatomy.View("MLO", "file name")
    assert anatomy.view_of(classes, file_name="0_R-CC.png") == anatomy.View("CC", "file name")
    assert anatomy.view_of(classes, file_name="Calc-Training_P_00005_RIGHT_CC_1.png").name == "CC"
    # CSAW-S names carry a view index, not a view: the image decides (no pectoral evidence -> CC)
    assert anatomy.view_of(classes, file_name="002_0.png") == anatomy.View("CC", "image")
    assert anatomy.view_from_text("MCC") is None and anatomy.view_from_text("mlo_view") == "MLO"


def test_a_detector_strip_at_the_image_edge_is_not_breast():
    classes = _breast()
    classes[:, W - 4:] = ADIPOSE  # a bright detector strip along the far edge, apart from the breast
    classes[5:15, 100:110] = FGT  # a burned-in label, apart from the breast
    result = anatomy.reconcile(_probs(classes), file_name="a_CC.png")
    expected = _breast()
    assert np.array_equal(result.classes, expected)
    assert any("set to background" in note for note in result.notes)
    assert result.changed_fraction == pytest.approx((4 * H + 100) / int((expected != 0).sum()))


def test_a_hole_inside_the_breast_is_breast():
    classes = _breast()
    classes[95:105, 20:30] = BACKGROUND
    result = anatomy.reconcile(_probs(classes, {BACKGROUND: FGT}), file_name="a_CC.png")
    assert (result.classes[95:105, 20:30] == FGT).all()  # the most probable breast class there
    assert np.array_equal(result.classes != 0, _breast() != 0)


def test_a_cc_view_with_a_bright_upper_corner_has_no_muscle():
    classes = _breast()
    corner = np.zeros_like(classes, bool)
    corner[5:60, :30] = True
    corner &= classes != 0
    classes[corner] = PECTORAL  # the network calls the bright upper corner pectoral
    probs = _probs(classes)
    result = anatomy.reconcile(probs, view_position="CC")
    assert not (result.classes == PECTORAL).any()
    assert (result.classes[corner] == ADIPOSE).all()  # the runner-up of those pixels
    assert result.view == anatomy.View("CC", "dicom ViewPosition")
    assert any("CC" in note and "pectoral" in note for note in result.notes)


def test_a_cc_crescent_against_the_chest_wall_may_stay():
    classes = _breast()
    crescent = np.zeros_like(classes, bool)
    crescent[80:120, :2] = True  # 2 px wide (< 5 % of the breast's width), 80 px (< 1 % of the breast)
    classes[crescent] = PECTORAL
    result = anatomy.reconcile(_probs(classes), view_position="CC")
    assert np.array_equal(result.classes == PECTORAL, crescent)
    assert result.notes == []


def _mlo(spread_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """An MLO-like map: the breast with a muscle triangle at the top of the chest wall, and the network's muscle
    spread as a band down the chest wall to ``spread_rows`` plus a pectoral island in the middle of the breast."""
    classes = _breast()
    classes[:5] = 0
    yy, xx = np.mgrid[:H, :W]
    triangle = (xx < 40 * (1 - (yy - 5) / 60)) & (yy >= 5) & (classes != 0)
    classes[triangle] = PECTORAL
    band = (yy < spread_rows) & (xx < 30) & (classes != 0)
    classes[band] = PECTORAL
    island = (np.abs(yy - 150) < 6) & (np.abs(xx - 40) < 6)
    classes[island] = PECTORAL
    return classes, triangle


def test_an_mlo_muscle_that_is_plausible_is_kept_and_an_island_removed():
    classes, triangle = _mlo(spread_rows=0)
    result = anatomy.reconcile(_probs(classes), view_position="MLO")
    assert np.array_equal(result.classes == PECTORAL, triangle)
    assert (result.classes[144:156, 34:46] == ADIPOSE).all() or (result.classes[144:156, 34:46] != PECTORAL).all()


def test_an_mlo_muscle_spread_down_the_chest_wall_is_capped():
    classes, _ = _mlo(spread_rows=H)  # the band runs the whole chest wall: > 30 % of the breast
    breast = classes != 0
    assert (classes == PECTORAL).sum() > 0.3 * breast.sum()
    result = anatomy.reconcile(_probs(classes), view_position="MLO")
    muscle = result.classes == PECTORAL
    cap = anatomy.MAX_PECTORAL_FRACTION * breast.sum()
    assert cap - 40 < muscle.sum() <= cap  # cut at the row where it reaches the cap (rows are at most 40 px wide)
    rows = np.flatnonzero(muscle.any(axis=1))
    band_rows = np.flatnonzero((classes[:, :30] == PECTORAL).any(axis=1))
    assert rows[0] == 5 and rows[-1] < band_rows[-1] - 10  # kept from the top, cut before the chest wall's end
    for y in rows:  # every row runs from the chest wall without holes
        run = np.flatnonzero(muscle[y])
        assert run[0] == 0 and run.size == run[-1] + 1
    assert any("MLO" in note and "kept" in note for note in result.notes)


def test_a_map_that_obeys_every_rule_is_left_alone():
    classes, _ = _mlo(spread_rows=0)
    classes[(classes == PECTORAL) & (np.mgrid[:H, :W][0] > 100)] = ADIPOSE  # no island
    result = anatomy.reconcile(_probs(classes), view_position="MLO")
    assert np.array_equal(result.classes, classes)
    assert result.notes == [] and result.changed_fraction == 0.0
