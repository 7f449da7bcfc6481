"""evaluate.py on the digital-mammogram sets: density figures, the Otsu baseline, pectoral Dice and the ROI box
fraction computed by hand on tiny arrays; the --density-dir / --csaw-dir wiring on synthetic folders; and one run of
the real sets (VinDr density, CSAW-S) with the untrained checkpoints of conftest.py."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pandas as pd
import pytest

from mammo.cli import evaluate
from mammo import imaging
from mammo.core import metrics
from mammo.imaging import roi
from mammo.evaluation import predictors, scores
from mammo.evaluation.cases import Case, exclude_patients, read_patient_list


def _run(argv: list[str]) -> int:
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------- hand-computed
# 0 background, 1 adipose, 2 FGT, 3 pectoral; breast (adipose + FGT) = 9 px, FGT = 3 px
PRED = np.array([[0, 1, 1, 2],
                 [0, 1, 2, 2],
                 [0, 1, 1, 1],
                 [3, 3, 0, 0]], np.uint8)
DENSE = np.zeros((4, 4), bool)
DENSE[[0, 1, 2, 0], [3, 3, 3, 0]] = True  # 4 px: 2 on predicted FGT, 1 on adipose, 1 on background
PIXELS = np.where(PRED == 3, 250, np.where(PRED == 0, 0, 40)).astype(np.uint8)
PIXELS[[0, 1, 2, 2], [3, 3, 3, 2]] = 180  # the bright breast pixels: the Otsu FGT


def test_density_row_by_hand():
    row = scores.density_row(PIXELS, PRED, DENSE)
    assert row["breast_pixels"] == 9
    assert row["fgt_dice"] == pytest.approx(2 * 2 / (3 + 4))
    assert row["percent_density_pred"] == pytest.approx(100 * 3 / 9)
    assert row["percent_density_mask"] == pytest.approx(100 * 4 / 9)  # all mask pixels / predicted breast pixels
    assert row["density_abs_error"] == pytest.approx(100 / 9)
    # Otsu on the breast pixels (40 x5, 180 x4): the first level of the tie is 40; FGT = the four 180s
    assert row["otsu_level"] == 40
    assert row["otsu_fgt_pred_pixels"] == 4 and row["otsu_fgt_intersection_pixels"] == 3
    assert row["otsu_fgt_dice"] == pytest.approx(2 * 3 / (4 + 4))
    assert row["otsu_percent_density_pred"] == pytest.approx(100 * 4 / 9)
    assert row["otsu_density_abs_error"] == pytest.approx(0.0)
    # the level equals OpenCV's Otsu on the breast pixels alone (the pectoral 250s are left out)
    breast = np.isin(PRED, (1, 2))
    assert cv2.threshold(PIXELS[breast].reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0] == 40
    # no predicted breast: mask density undefined, Otsu empty
    empty = scores.density_row(PIXELS, np.zeros_like(PRED), DENSE)
    assert math.isnan(empty["percent_density_mask"]) and empty["otsu_fgt_pred_pixels"] == 0


def test_summarize_density_by_hand():
    rows = [scores.density_row(PIXELS, PRED, DENSE), scores.density_row(PIXELS, PRED, np.zeros_like(DENSE))]
    summary = scores.summarize_density(rows)
    assert summary["n_images"] == 2 and summary["density_images"] == 2
    model = summary["model"]
    # image 2: no dense pixel, 3 FGT predicted -> Dice 0, error 33.3 points
    assert model["fgt_dice_mean"] == pytest.approx((4 / 7 + 0) / 2)
    assert model["fgt_dice_std"] == pytest.approx(np.std([4 / 7, 0], ddof=1))
    assert model["fgt_dice_pooled"] == pytest.approx(2 * 2 / (6 + 4))
    assert model["density_abs_error_mean"] == pytest.approx((100 / 9 + 100 / 3) / 2)
    assert math.isnan(model["density_pearson_r"])  # the model's density is constant: r undefined
    assert summary["otsu_baseline"]["density_pearson_r"] == pytest.approx(np.nan, nan_ok=True)
    assert summary["percent_density_mask_mean"] == pytest.approx(100 * 2 / 9)


def test_pearson_r():
    assert metrics.pearson_r([1, 2, 3, 4], [2, 4, 7, 7]) == pytest.approx(np.corrcoef([1, 2, 3, 4], [2, 4, 7, 7])[0, 1])
    assert metrics.pearson_r([1, 2, np.nan, 3], [-1, -2, 5, -3]) == pytest.approx(-1.0)  # the NaN pair is dropped
    assert math.isnan(metrics.pearson_r([1], [2])) and math.isnan(metrics.pearson_r([1, 1], [2, 3]))


def test_roi_box_fraction_by_hand():
    classes = np.zeros((20, 20), np.uint8)
    classes[5:15, 3:13] = 1  # breast bounding box 10 x 10 = 100 px
    classes[5:8, 3:5] = 3  # pectoral counts as breast (its corner is inside the same box)
    box = roi.RoiBox(6, 4, 11, 8)  # 5 x 4 = 20 px
    assert metrics.box_area(box) == metrics.box_area((6, 4, 11, 8)) == 20
    assert metrics.bounding_box(classes != 0) == (5, 3, 15, 13)
    assert metrics.roi_box_fraction(box, classes != 0) == pytest.approx(0.2)
    fields = scores.roi_box_fields(box, classes)
    assert fields == {"roi_box_fraction": pytest.approx(0.2), "roi_box_area_pixels": 20.0,
                      "breast_box_area_pixels": 100.0}
    pectoral_only = np.zeros((20, 20), np.uint8)
    pectoral_only[0:4, 0:5] = 3  # breast = pectoral only: 4 x 5 box
    assert scores.roi_box_fields(roi.RoiBox(0, 0, 2, 5), pectoral_only)["roi_box_fraction"] == pytest.approx(0.5)
    assert math.isnan(metrics.roi_box_fraction(box, np.zeros((20, 20), bool)))
    assert math.isnan(scores.roi_box_fields(None, classes)["roi_box_fraction"])
    # in a lesion row and its summary (per-image mean, pooled areas, source counts)
    prob, truth = np.zeros((20, 20), np.float32), np.zeros((20, 20), bool)
    row1 = scores.lesion_row(prob, truth, box, 0.5, 0.1, 1, classes, "fgt")
    row2 = scores.lesion_row(prob, truth, roi.RoiBox(0, 0, 10, 5), 0.5, 0.1, 1, pectoral_only, "breast")
    row3 = scores.lesion_row(prob, truth, box, 0.5, 0.1)  # no tissue map: unknown
    assert row1["roi_box_fraction"] == pytest.approx(0.2) and row2["roi_box_fraction"] == pytest.approx(2.5)
    summary = scores.summarize_lesion([row1, row2, row3])
    assert summary["roi_box_fraction_mean"] == pytest.approx((0.2 + 2.5) / 2)
    assert summary["roi_box_fraction_pooled"] == pytest.approx((20 + 50) / (100 + 20))
    assert summary["roi_box_fraction_images"] == 2
    assert summary["roi_sources"] == {"fgt": 1, "breast": 1, "image": 0}


def test_pectoral_dice_by_hand():
    classes = np.ones((10, 10), np.uint8)
    classes[0:4, 0:4] = 3  # 16 px predicted pectoral
    pectoral = np.zeros((10, 10), bool)
    pectoral[0:4, 2:6] = True  # 16 px, 8 shared
    predicted = predictors.LesionPrediction(np.zeros((10, 10), np.float32), roi.RoiBox(0, 0, 10, 10), classes, "breast")
    truth = np.zeros((10, 10), bool)
    mlo = scores.csaw_row(predicted, truth, pectoral, 0.5, 0.1, 1)
    assert mlo["has_pectoral"] and mlo["pectoral_dice"] == pytest.approx(2 * 8 / 32)
    cc = scores.csaw_row(predicted, truth, np.zeros((10, 10), bool), 0.5, 0.1, 1)
    assert not cc["has_pectoral"] and math.isnan(cc["pectoral_dice"])
    rows = [{"stem": "001_1", "patient": "001", **mlo}, {"stem": "001_0", "patient": "001", **cc}]
    summary = scores.summarize_csaw(rows)
    assert summary["pectoral"]["n_images"] == 1 and summary["pectoral"]["per_image"] == {"001_1": pytest.approx(0.5)}
    assert summary["pectoral"]["dice_mean"] == pytest.approx(0.5) and summary["lesion"]["n_images"] == 2
    with pytest.raises(ValueError, match="tissue map"):
        scores.csaw_row(predictors.LesionPrediction(predicted.prob, None), truth, pectoral, 0.5, 0.1, 1)


def test_patient_lists(tmp_path):
    assert read_patient_list("002, 1,P105") == {"2", "1", "P105"}
    listed = tmp_path / "ids.txt"
    listed.write_text("# trained on\nP105\nP2, P3\n")
    assert read_patient_list(str(listed)) == {"P105", "P2", "P3"}
    table = tmp_path / "table.csv"
    table.write_text("image_file_path,patient_id,split\na.png,CSAW_000,train\nb.png,CSAW_002,test\n")
    assert read_patient_list(str(table)) == {"CSAW_000"}  # the train rows only
    cases = [Case("000_0", "/x/000_0.png", "", patient="000"),
             Case("002_1", "/x/002_1.png", "", patient="002"),
             Case("P105_R_DM_CC", "/x/flipped_P105_R_DM_CC.jpg", "")]
    kept, dropped = exclude_patients(cases, {"CSAW_000", "P105"})
    assert [c.stem for c in kept] == ["002_1"] and dropped == 2


# ---------------------------------------------------------------------------------------------- CLI, synthetic folders
def _csaw_folder(root):
    """Two 40x30 CSAW-S images of patients 001 (MLO, pectoral) and 002 (CC, no pectoral), a cancer on each."""
    for name in ("images", "masks"):
        (root / name).mkdir(parents=True)
    for stem, pectoral in (("001_1", True), ("002_0", False)):
        imaging.write_png(root / "images" / f"{stem}.png", np.full((40, 30), 90, np.uint8))
        cancer = np.zeros((40, 30), np.uint8)
        cancer[20:24, 10:15] = 255  # 20 px
        imaging.write_png(root / "masks" / f"{stem}_cancer.png", cancer)
        muscle = np.zeros((40, 30), np.uint8)
        if pectoral:
            muscle[0:10, 0:10] = 255  # 100 px
        imaging.write_png(root / "masks" / f"{stem}_pectoral_muscle.png", muscle)


def test_csaw_and_density_from_predictions_folder(tmp_path):
    csaw = tmp_path / "csaw"
    _csaw_folder(csaw)
    density = tmp_path / "density"
    for name in ("images", "masks"):
        (density / name).mkdir(parents=True)
    imaging.write_png(density / "images" / "7.png", PIXELS)
    imaging.write_png(density / "masks" / "7.png", DENSE.astype(np.uint8) * 255)
    preds = tmp_path / "preds"
    imaging.write_png(preds / "7_tissue_seg.png", PRED)
    tissue = np.zeros((40, 30), np.uint8)
    tissue[0:40, 0:20] = 1  # breast box 40 x 20 = 800 px
    tissue[0:10, 0:5] = 3  # 50 px pectoral, 50 shared with the 100 px mask -> Dice 100 / 150
    prob = np.zeros((40, 30), np.uint8)
    prob[20:24, 10:15] = 255  # the cancer exactly
    for stem in ("001_1", "002_0"):
        imaging.write_png(preds / f"{stem}_tissue_seg.png", tissue)
        imaging.write_png(preds / f"{stem}_cancer_prob.png", prob)
        # ROI box 10 x 16 = 160 px -> fraction 0.2; it holds 2 of the cancer's 4 rows -> coverage 0.5
        (preds / f"{stem}.json").write_text(json.dumps({"roi": {"box": {"y0": 12, "x0": 2, "y1": 22, "x1": 18},
                                                                "source": "fgt"}}))
    out = tmp_path / "eval"
    assert _run(["--density-dir", str(density), "--csaw-dir", str(csaw), "--predictions-dir", str(preds),
                 "--output-dir", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["density"]["model"]["fgt_dice_mean"] == pytest.approx(4 / 7)
    assert summary["density"]["otsu_baseline"]["fgt_dice_mean"] == pytest.approx(0.75)
    assert summary["density"]["model"]["density_abs_error_mean"] == pytest.approx(100 / 9)
    pectoral, lesion = summary["csaw"]["pectoral"], summary["csaw"]["lesion"]
    assert summary["csaw"]["patients"] == ["001", "002"]
    assert pectoral["n_images"] == 1 and pectoral["per_image"] == {"001_1": pytest.approx(2 / 3)}
    assert lesion["dice_mean"] == pytest.approx(1.0) and lesion["sensitivity"] == pytest.approx(1.0)
    assert lesion["roi_coverage_pooled"] == pytest.approx(0.5) and lesion["roi_box_fraction_mean"] == pytest.approx(0.2)
    assert lesion["roi_sources"] == {"fgt": 2, "breast": 0, "image": 0}
    table = pd.read_csv(out / "per_image.csv", dtype={"patient": str})
    assert sorted(table["task"]) == ["csaw", "csaw", "density"]
    assert (out / "plots" / "density_scatter.png").is_file()
    # patient filters: keep patient 2 ("2" == "002"), or leave out patient 002 by a workspace-style id
    assert _run(["--csaw-dir", str(csaw), "--csaw-patients", "2", "--predictions-dir", str(preds), "--no-plots",
                 "--output-dir", str(tmp_path / "only2")]) == 0
    only2 = json.loads((tmp_path / "only2" / "metrics.json").read_text())["csaw"]
    assert only2["patients"] == ["002"] and only2["pectoral"]["n_images"] == 0
    assert _run(["--csaw-dir", str(csaw), "--exclude-patients", "CSAW_002", "--predictions-dir", str(preds),
                 "--no-plots", "--output-dir", str(tmp_path / "no2")]) == 0
    assert json.loads((tmp_path / "no2" / "metrics.json").read_text())["csaw"]["patients"] == ["001"]
    assert _run(["--csaw-dir", str(csaw), "--csaw-patients", "005", "--predictions-dir", str(preds),
                 "--output-dir", str(tmp_path / "bad")]) == 2  # an unknown patient is a usage error


# ---------------------------------------------------------------------------------------------- CLI, real data
def test_real_density_and_csaw_with_untrained_cascade(shared_data, checkpoint_dir, tmp_path):
    density, csaw = shared_data / "vindr_density_dev", shared_data / "csaw_s_dev"
    if not density.is_dir() or not csaw.is_dir():
        pytest.skip(f"vindr_density_dev/ or csaw_s_dev/ not found in {shared_data}")
    out = tmp_path / "eval"
    assert _run(["--density-dir", str(density), "--csaw-dir", str(csaw), "--limit", "2", "--no-plots",
                 "--stage1-weights", str(checkpoint_dir / "stage1" / "best_stage1.pth"),
                 "--stage2-weights", str(checkpoint_dir / "stage2" / "best_stage2.pth"), "--threads", "2",
                 "--output-dir", str(out)]) == 0
    summary = json.loads((out / "metrics.json").read_text())
    assert not summary["skipped"]
    dens = summary["density"]
    assert dens["n_images"] == 2 and {"model", "otsu_baseline", "percent_density_mask_mean"} <= set(dens)
    for part in ("model", "otsu_baseline"):
        figures = dens[part]
        assert set(figures) == {"fgt_dice_mean", "fgt_dice_std", "fgt_dice_pooled", "percent_density_mean",
                                "density_abs_error_mean", "density_abs_error_std", "density_pearson_r"}
        assert 0 <= figures["fgt_dice_mean"] <= 1 and 0 <= figures["fgt_dice_pooled"] <= 1
        assert 0 <= figures["density_abs_error_mean"] <= 100
        assert figures["density_pearson_r"] is None or -1 <= figures["density_pearson_r"] <= 1
    cs = summary["csaw"]
    assert cs["n_images"] == 2 and cs["patients"] == ["000"]
    assert cs["pectoral"]["n_images"] == 1 and list(cs["pectoral"]["per_image"]) == ["000_1"]  # 000_0 is a CC view
    assert 0 <= cs["pectoral"]["dice_mean"] <= 1
    lesion = cs["lesion"]
    for key in ("dice_mean", "dice_pooled", "sensitivity", "roi_coverage_mean", "roi_coverage_pooled"):
        assert 0 <= lesion[key] <= 1, key
    assert lesion["roi_box_fraction_images"] == 2 and lesion["roi_box_fraction_mean"] > 0
    assert sum(lesion["roi_sources"].values()) == 2
    table = pd.read_csv(out / "per_image.csv")
    assert list(table["task"]) == ["density", "density", "csaw", "csaw"]
