"""evaluate.py: hand-computed metrics from a predictions folder, the cascade mode (both backends), errors;
metrics.lesion_detection on hand-made masks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mammo.weights import checkpoints
from mammo.cli import evaluate
from mammo import imaging
from mammo.core import metrics
from mammo.evaluation import cases
from mammo.nn.models import build_model, default_model_config


def _run(argv: list[str]) -> int:
    return evaluate.main(evaluate.get_args_parser().parse_args(argv))


# ---------------------------------------------------------------------------------------------- lesion detection
def test_lesion_detection_counts_by_hand():
    truth = np.zeros((20, 20), bool)
    truth[2:6, 2:6] = True  # lesion A, 16 px
    truth[10:14, 10:14] = True  # lesion B, 16 px
    pred = np.zeros((20, 20), bool)
    pred[2:6, 4:8] = True  # overlaps A: 8 / (16 + 16 - 8) = 0.33 -> A found
    pred[10, 10] = True  # touches B: 1 / 16 = 0.0625 < 0.1 -> B missed, and a false positive
    pred[16:19, 0:3] = True  # on nothing: false positive
    assert metrics.lesion_detection(pred, truth) == {"lesions": 2, "found": 1, "detections": 3, "false_positives": 2}
    # with a threshold below 1/16 the one-pixel touch detects B
    assert metrics.lesion_detection(pred, truth, iou_threshold=0.05)["found"] == 2
    empty = np.zeros((5, 5), bool)
    assert metrics.lesion_detection(empty, empty) == {"lesions": 0, "found": 0, "detections": 0, "false_positives": 0}
    # diagonal neighbours are one lesion under 8-connectivity and two under 4-connectivity
    diagonal = np.eye(4, dtype=bool)
    assert metrics.lesion_detection(diagonal, diagonal)["lesions"] == 1
    assert metrics.lesion_detection(diagonal, diagonal, connectivity=4)["lesions"] == 4
    with pytest.raises(ValueError, match="shape"):
        metrics.lesion_detection(empty, np.zeros((4, 4)))
    # with a minimum area of 9 px the one-pixel prediction and a one-pixel truth speck count for nothing
    speck = truth.copy()
    speck[18, 18] = True
    assert metrics.lesion_detection(pred, speck)["lesions"] == 3
    assert metrics.lesion_detection(pred, speck, min_area_px=9) == {"lesions": 2, "found": 1, "detections": 2,
                                                                      "false_positives": 1}


def test_acquisition_group():
    assert cases.acquisition_group("P105_R_CM_MLO.jpg") == "CM"
    assert cases.acquisition_group("flipped_P2_L_DM_CC.jpg") == "DM"
    assert cases.acquisition_group("anything.png", "cm") == "CM"
    assert cases.acquisition_group("0_R-CC.png") == ""


# ---------------------------------------------------------------------------------------------- predictions folder
def _tissue_subset(tissue_dir, tmp_path, n=3):
    """A DDSM-layout folder holding the first ``n`` real tissue pairs (symlinks), so tests read few images."""
    root = tmp_path / "tissue"
    for sub in ("fgt_seg", "fgt_seg_labels"):
        (root / sub).mkdir(parents=True)
    images = sorted((tissue_dir / "fgt_seg").glob("*.png"))[:n]
    for image in images:
        (root / "fgt_seg" / image.name).symlink_to(image)
        label = tissue_dir / "fgt_seg_labels" / f"{image.stem}_LI.png"
        (root / "fgt_seg_labels" / label.name).symlink_to(label)
    return root, images


def test_tissue_metrics_from_predictions_folder(tissue_dir, tmp_path):
    root, images = _tissue_subset(tissue_dir, tmp_path)
    preds = tmp_path / "preds"
    truth0 = imaging.read_mask(tissue_dir / "fgt_seg_labels" / f"{images[0].stem}_LI.png", kind="tissue")
    truth1 = imaging.read_mask(tissue_dir / "fgt_seg_labels" / f"{images[1].stem}_LI.png", kind="tissue")
    imaging.write_png(preds / f"{images[0].stem}_tissue_seg.png", truth0)  # perfect
    wrong = truth1.copy()
    wrong[wrong == 2] = 1  # every FGT pixel called adipose
    imaging.write_png(preds / "sub" / f"{images[1].stem}_tissue_seg.png", wrong)  # found in a sub-folder too
    # images[2] has no prediction: skipped and reported
    out = tmp_path / "eval"
    assert _run(["--tissue-dir", str(root), "--predictions-dir", str(preds), "--output-dir", str(out)]) == 0

    summary = json.loads((out / "metrics.json").read_text())
    a, f = int((truth1 == 1).sum()), int((truth1 == 2).sum())
    assert f > 0
    dice_adipose_1 = 2 * a / (2 * a + f)  # |P n T| = a, |P| = a + f, |T| = a
    # image 1: background and pectoral perfect, FGT 0, adipose as above
    dice4_1 = (1 + dice_adipose_1 + 0 + 1) / 4
    tissue = summary["tissue"]
    assert tissue["n_images"] == 2
    assert tissue["mean"]["dice_4channel"] == pytest.approx((1.0 + dice4_1) / 2)
    assert tissue["mean"]["macro_dice"] == pytest.approx((1.0 + (dice_adipose_1 + 0 + 1) / 3) / 2)
    assert tissue["mean"]["dice_fgt"] == pytest.approx(0.5)
    assert tissue["mean"]["pixel_accuracy"] == pytest.approx((1.0 + 1 - f / truth1.size) / 2)
    # pooled FGT Dice: 2 * F0 / (F0 + F0 + F1) where F0 is image 0's FGT area
    f0 = int((truth0 == 2).sum())
    assert tissue["pooled"]["dice_fgt"] == pytest.approx(2 * f0 / (2 * f0 + f))
    assert tissue["pooled"]["pixel_accuracy"] == pytest.approx(1 - f / (truth0.size + truth1.size))
    assert tissue["published_reference_dice_4channel"]["ResNet50-U-net"]["mean"] == 0.851
    assert "empty_mask" in summary["conventions"] and "IoU >= match_iou" in summary["conventions"]["lesion_detection"]
    assert len(summary["skipped"]) == 1 and images[2].stem in summary["skipped"][0]["image"]

    table = pd.read_csv(out / "per_image.csv")
    assert list(table["stem"]) == [images[0].stem, images[1].stem]
    assert table.loc[0, "dice_4channel"] == pytest.approx(1.0)
    assert table.loc[1, "dice_fgt"] == pytest.approx(0.0)
    assert (out / "plots" / "dice_distribution.png").stat().st_size > 0
    assert (out / "plots" / "worst_tissue.png").stat().st_size > 0

    # existing outputs are not overwritten silently
    assert _run(["--tissue-dir", str(root), "--predictions-dir", str(preds), "--output-dir", str(out)]) == 2
    assert _run(["--tissue-dir", str(root), "--predictions-dir", str(preds), "--output-dir", str(out),
                 "--overwrite", "--no-plots"]) == 0


def test_lesion_metrics_from_predictions_folder(lesion_dir, tmp_path):
    names = ["P105_R_CM_MLO", "P111_R_DM_MLO"]
    root = tmp_path / "lesion"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
        for name in names:
            (root / sub / f"{name}.jpg").symlink_to(lesion_dir / sub / f"{name}.jpg")
    preds = tmp_path / "preds"
    truth_cm = imaging.read_mask(lesion_dir / "masks" / f"{names[0]}.jpg").astype(bool)
    truth_dm = imaging.read_mask(lesion_dir / "masks" / f"{names[1]}.jpg").astype(bool)
    # CM: perfect probability map; the ROI box covers only the top half of the image
    imaging.write_png(preds / f"{names[0]}_cancer_prob.png", truth_cm.astype(np.uint8) * 255)
    half = truth_cm.shape[0] // 2
    (preds / f"{names[0]}.json").write_text(json.dumps({"roi": {"box": {"y0": 0, "x0": 0, "y1": half,
                                                                         "x1": truth_cm.shape[1]}}}))
    # DM: the truth at p = 0.4 (below the 0.5 threshold: nothing found) plus a 10x10 blob far from any lesion
    prob_dm = (truth_dm * 102).astype(np.uint8)
    blob = np.zeros_like(truth_dm)
    blob[:10, :10] = True
    assert not (blob & truth_dm).any()
    prob_dm[blob] = 255
    imaging.write_png(preds / f"{names[1]}_cancer_prob.png", prob_dm)
    out = tmp_path / "eval"
    assert _run(["--lesion-dir", str(root), "--predictions-dir", str(preds), "--output-dir", str(out)]) == 0

    lesion = json.loads((out / "metrics.json").read_text())["lesion"]
    import cv2

    n_cm = cv2.connectedComponents(truth_cm.astype(np.uint8), connectivity=8)[0] - 1
    n_dm = cv2.connectedComponents(truth_dm.astype(np.uint8), connectivity=8)[0] - 1
    assert lesion["CM"]["dice_mean"] == pytest.approx(1.0)
    assert lesion["CM"]["sensitivity"] == pytest.approx(1.0) and lesion["CM"]["false_positives"] == 0
    assert lesion["CM"]["roi_coverage_pooled"] == pytest.approx(truth_cm[:half].sum() / truth_cm.sum())
    assert lesion["DM"]["dice_mean"] == pytest.approx(0.0) and lesion["DM"]["sensitivity"] == 0.0
    assert lesion["DM"]["false_positives"] == 1 and lesion["DM"]["roi_coverage_images"] == 0
    assert lesion["all"]["lesions"] == n_cm + n_dm
    assert lesion["all"]["sensitivity"] == pytest.approx(n_cm / (n_cm + n_dm))
    assert lesion["all"]["false_positives_per_image"] == pytest.approx(0.5)
    inter, pred_px, truth_px = truth_cm.sum(), truth_cm.sum() + 100, truth_cm.sum() + truth_dm.sum()
    assert lesion["all"]["dice_pooled"] == pytest.approx(2 * inter / (pred_px + truth_px))
    assert (out / "plots" / "worst_lesion.png").is_file()


# ---------------------------------------------------------------------------------------------- cascade mode
def _save_stage(path, stage: int, size, seed: int):
    torch.manual_seed(seed)
    config = default_model_config(4 if stage == 1 else 1, encoder_name="resnet18")
    checkpoint = checkpoints.make_checkpoint(stage=stage, model=build_model(config), model_config=config,
                                         preprocess_config=imaging.DEFAULT_PREPROCESS, input_size=size)
    return checkpoints.save_checkpoint(checkpoint, path)


def test_cascade_mode_torch_and_onnxruntime_agree(tissue_dir, lesion_dir, tmp_path):
    root, _ = _tissue_subset(tissue_dir, tmp_path, n=2)
    s1 = _save_stage(tmp_path / "s1.pth", 1, (128, 64), seed=0)
    s2 = _save_stage(tmp_path / "s2.pth", 2, (64, 64), seed=1)
    lesion_root = tmp_path / "lesion"
    for sub in ("images", "masks"):
        (lesion_root / sub).mkdir(parents=True)
        (lesion_root / sub / "P105_R_CM_MLO.jpg").symlink_to(lesion_dir / sub / "P105_R_CM_MLO.jpg")
    common = ["--tissue-dir", str(root), "--lesion-dir", str(lesion_root), "--stage1-weights", str(s1),
              "--stage2-weights", str(s2), "--threads", "1", "--no-plots"]
    assert _run(common + ["--output-dir", str(tmp_path / "torch")]) == 0
    assert _run(common + ["--output-dir", str(tmp_path / "ort"), "--backend", "onnxruntime",
                          "--export-onnx", str(tmp_path / "onnx")]) == 0
    assert (tmp_path / "onnx" / "stage1.onnx").is_file() and (tmp_path / "onnx" / "stage2.onnx").is_file()
    by_torch = json.loads((tmp_path / "torch" / "metrics.json").read_text())
    by_ort = json.loads((tmp_path / "ort" / "metrics.json").read_text())
    assert by_torch["evaluation"]["mode"] == "cascade" and by_ort["evaluation"]["backend"] == "onnxruntime"
    assert by_torch["tissue"]["n_images"] == 2 and by_torch["lesion"]["all"]["n_images"] == 1
    for key in ("dice_4channel", "macro_dice", "pixel_accuracy"):
        assert by_ort["tissue"]["mean"][key] == pytest.approx(by_torch["tissue"]["mean"][key], abs=1e-4)
    assert by_ort["lesion"]["all"]["dice_mean"] == pytest.approx(by_torch["lesion"]["all"]["dice_mean"], abs=1e-3)
    # the exported .onnx files are accepted as weights
    assert _run(["--tissue-dir", str(root), "--stage1-weights", str(tmp_path / "onnx" / "stage1.onnx"),
                 "--backend", "onnxruntime", "--threads", "1", "--no-plots",
                 "--output-dir", str(tmp_path / "ort2")]) == 0
    again = json.loads((tmp_path / "ort2" / "metrics.json").read_text())
    assert again["tissue"]["mean"]["dice_4channel"] == pytest.approx(by_torch["tissue"]["mean"]["dice_4channel"],
                                                                     abs=1e-4)


def test_usage_errors(tissue_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    monkeypatch.setenv("MAMMO_WEIGHTS_DIR", str(tmp_path / "no_weights"))  # no shipped model there
    assert _run(["--tissue-dir", str(tissue_dir), "--output-dir", out]) == 2  # no predictions, no model
    assert _run(["--tissue-dir", str(tissue_dir), "--predictions-dir", out, "--stage1-weights", "x.pth",
                 "--output-dir", out]) == 2
    assert _run(["--predictions-dir", out, "--output-dir", out]) == 2  # no ground truth
    assert _run(["--tissue-dir", str(tmp_path), "--predictions-dir", out, "--output-dir", out]) == 2  # bad layout
    assert _run(["--tissue-dir", str(tissue_dir), "--predictions-dir", str(tmp_path / "none"),
                 "--output-dir", out]) == 2
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_all_items_failing_returns_1(tissue_dir, tmp_path):
    root, _ = _tissue_subset(tissue_dir, tmp_path, n=1)
    preds = tmp_path / "preds"
    preds.mkdir()
    assert _run(["--tissue-dir", str(root), "--predictions-dir", str(preds), "--output-dir", str(tmp_path / "o")]) == 1
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["skipped"]


def test_tissue_csv_with_split(tissue_dir, tmp_path):
    images = sorted((tissue_dir / "fgt_seg").glob("*.png"))[:2]
    rows = ["image_file_path,label_file_path,patient_id,source,split"]
    for image, split in zip(images, ("train", "val")):
        rows.append(f"{image},{tissue_dir / 'fgt_seg_labels' / (image.stem + '_LI.png')},,ddsm,{split}")
    csv = tmp_path / "tissue_dataset.csv"
    csv.write_text("\n".join(rows) + "\n")
    preds = tmp_path / "preds"
    for image in images:
        truth = imaging.read_mask(tissue_dir / "fgt_seg_labels" / f"{image.stem}_LI.png", kind="tissue")
        imaging.write_png(preds / f"{image.stem}_tissue_seg.png", truth)
    out = tmp_path / "eval"
    assert _run(["--tissue-csv", str(csv), "--split", "val", "--predictions-dir", str(preds), "--output-dir", str(out),
                 "--no-plots"]) == 0
    table = pd.read_csv(out / "per_image.csv")
    assert list(table["stem"]) == [images[1].stem]  # only the val row
    assert json.loads((out / "metrics.json").read_text())["tissue"]["mean"]["dice_4channel"] == pytest.approx(1.0)
    assert _run(["--tissue-csv", str(csv), "--split", "test", "--predictions-dir", str(preds),
                 "--output-dir", str(tmp_path / "e2")]) == 2  # no such split: a clear usage error
