"""Stage 1 on digital mammograms: partial labels (CSAW-S), the marginal loss, appearance augmentation, source
repeats."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss

from mammo import imaging
from mammo.training import inputs as trainer  # repeat_sources, split_table, TrainingInputError
from conftest import SHARED_DATA
from mammo.training.datasets import appearance_augmentation, tissue_augmentation
from mammo.core.labels import ADIPOSE_OR_FGT, IGNORE
from mammo.nn.losses import TissueLoss
from mammo.prepare.sources.common import Report
from mammo.prepare.sources.csaw_s import breast_region, csaw_samples, partial_tissue_label


# ------------------------------------------------------------------------------------------------ the loss
def test_marginal_cross_entropy_by_hand():
    # One pixel per code; logits chosen so that the softmax is easy to write down.
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).view(1, 4, 1, 1).repeat(1, 1, 1, 4)
    target = torch.tensor([[[0, 2, ADIPOSE_OR_FGT, IGNORE]]])
    z = math.exp(0) + math.exp(1) + math.exp(2) + math.exp(3)
    expected = (-math.log(1 / z) - math.log(math.exp(2) / z) - math.log((math.exp(1) + math.exp(2)) / z)) / 3
    ce_only = TissueLoss(dice_weight=0.0, ce_weight=1.0)(logits, target)
    assert ce_only.item() == pytest.approx(expected, rel=1e-6)


def test_dice_term_leaves_partial_pixels_out():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 6)
    target = torch.randint(0, 4, (2, 6, 6))
    partial = target.clone()
    partial[0, :3] = ADIPOSE_OR_FGT
    partial[1, :, :2] = IGNORE
    dice_only = TissueLoss(dice_weight=1.0, ce_weight=0.0)(logits, partial)
    # The same as smp's Dice with those pixels removed from prediction and truth.
    reference = DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE)(
        logits, partial.masked_fill(partial == ADIPOSE_OR_FGT, IGNORE))
    assert dice_only.item() == pytest.approx(reference.item(), rel=1e-6)
    fully = TissueLoss()(logits, target)
    plain = 0.5 * DiceLoss("multiclass", from_logits=True)(logits, target) + 0.5 * F.cross_entropy(logits, target)
    assert fully.item() == pytest.approx(plain.item(), rel=1e-6)


def test_marginal_loss_is_indifferent_between_adipose_and_fgt():
    target = torch.full((1, 2, 2), ADIPOSE_OR_FGT)
    as_fat = torch.tensor([0.0, 5.0, 0.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    as_fgt = torch.tensor([0.0, 0.0, 5.0, 0.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    as_muscle = torch.tensor([0.0, 0.0, 0.0, 5.0]).view(1, 4, 1, 1).expand(1, 4, 2, 2)
    loss = TissueLoss(dice_weight=0.0, ce_weight=1.0)
    assert loss(as_fat, target).item() == pytest.approx(loss(as_fgt, target).item())
    assert loss(as_muscle, target).item() > 4.0 > loss(as_fat, target).item()


# ------------------------------------------------------------------------------------------------ label files
def test_partial_label_file_reads_as_codes(tmp_path):
    values = np.array([[64, 128, 192, 255, 160, 32]], np.uint8)
    imaging.write_png(tmp_path / "lab.png", values)
    assert imaging.read_mask(tmp_path / "lab.png", "partial_tissue").tolist() == [[0, 1, 2, 3, ADIPOSE_OR_FGT,
                                                                                   IGNORE]]
    with pytest.raises(ValueError, match=r"160"):  # a plain tissue map may not hold them
        imaging.read_mask(tmp_path / "lab.png", "tissue")


def test_partial_label_rule_on_a_drawn_image():
    image = np.zeros((200, 100), np.uint8)
    image[20:180, :70] = 120  # breast against the left edge
    masks = {"mammary_gland": np.zeros(image.shape, bool), "pectoral_muscle": np.zeros(image.shape, bool),
             "nipple": np.zeros(image.shape, bool), "text": np.zeros(image.shape, bool),
             "cancer": np.zeros(image.shape, bool)}
    masks["mammary_gland"][60:140, 10:50] = True
    masks["pectoral_muscle"][20:50, :15] = True
    masks["text"][190:195, 80:95] = True
    label = partial_tissue_label(image, masks)
    assert breast_region(image)[100, 30] and not breast_region(image)[100, 90]
    assert label[100, 30] == 160 and label[150, 30] == 128 and label[100, 90] == 64  # gland, fat, background
    assert label[30, 5] == 255 and label[192, 85] == 32  # pectoral, text
    assert label[100, 70] == 32 and label[100, 60] == 128  # the band along the skin line (1 px at 200 px high)
    assert set(np.unique(label).tolist()) == {32, 64, 128, 160, 255}


def test_csaw_samples_on_the_real_set(tmp_path):
    root = SHARED_DATA / "csaw_s_dev"
    if not root.is_dir():
        pytest.skip(f"real data not found at {root} (../shared/data/csaw_s_dev)")
    report = Report()
    samples = csaw_samples(root, {"002"}, report)
    assert [s.name for s in samples] == ["000_0", "000_1", "001_0", "001_1", "002_0", "002_1"]
    assert [s.row["split"] for s in samples] == ["train"] * 4 + ["test"] * 2
    assert [s.row["view"] for s in samples] == ["CC", "MLO", "CC", "MLO", "MLO", "CC"]  # pectoral mask empty on CC
    built = samples[1].build()
    label = built.label
    pectoral = imaging.read_mask(root / "masks" / "000_1_pectoral_muscle.png", "binary").astype(bool)
    gland = imaging.read_mask(root / "masks" / "000_1_mammary_gland.png", "binary").astype(bool)
    assert label.shape == built.image.shape and (label[pectoral] == 255).all()
    inside_gland = label[gland & ~pectoral]
    assert np.isin(inside_gland, (160, 32)).all() and (inside_gland == 160).mean() > 0.95
    breast = label != 64
    assert 0.3 < breast.mean() < 0.9  # the breast is most of the picture, not all of it
    assert report.errors == [] and report.skipped == []


# ------------------------------------------------------------------------------------------------ augmentation
def test_appearance_augmentation_changes_the_image_not_the_mask():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 32), dtype=np.uint8)
    mask = rng.integers(0, 4, (64, 32), dtype=np.uint8)
    pipeline = appearance_augmentation(curve_p=1.0, clahe_p=1.0, texture_p=1.0)
    pipeline.set_random_seed(3)
    out = pipeline(image=image, mask=mask)
    assert out["image"].shape == image.shape and out["image"].dtype == np.uint8
    assert not np.array_equal(out["image"], image) and np.array_equal(out["mask"], mask)
    names = [type(t).__name__ for t in tissue_augmentation(appearance=True).transforms]
    assert {"OneOf", "CLAHE"} <= set(names) and "CLAHE" not in [type(t).__name__ for t in tissue_augmentation()]


# ------------------------------------------------------------------------------------------------ training rows
def test_source_repeat_repeats_only_that_source():
    train = pd.DataFrame({"image_file_path": ["a", "b", "c"], "source": ["ddsm_tissue", "csaw-s", "ddsm_tissue"]})
    out = trainer.repeat_sources(train, ["csaw-s=3"])
    assert out["image_file_path"].tolist() == ["a", "b", "c", "b", "b"]
    assert trainer.repeat_sources(train, []).equals(train)
    for bad, words in (("csaw-s=0", "N >= 1"), ("csaw-s", "SOURCE=N"), ("inbreast=2", "sources: csaw-s, ddsm")):
        with pytest.raises(trainer.TrainingInputError, match=words):
            trainer.repeat_sources(train, [bad])


def test_split_table_applies_the_repeats_to_training_rows_only():
    table = pd.DataFrame({"image_file_path": list("abcd"), "patient_id": list("abcd"),
                          "source": ["ddsm_tissue", "csaw-s", "ddsm_tissue", "csaw-s"],
                          "split": ["train", "train", "val", "test"]})
    args = argparse.Namespace(folds=None, fold=None, val_fraction=None, seed=0, source_repeat=["csaw-s=2"])
    train, val, _ = trainer.split_table(table, args)
    assert train["image_file_path"].tolist() == ["a", "b", "b"] and val["image_file_path"].tolist() == ["c"]


# ------------------------------------------------------------------------------------------------ the ROI rule
def test_roi_rule_margins_specks_and_clipping():
    from mammo.imaging.roi import RoiRule, fgt_roi_box
    classes = np.zeros((200, 100), np.uint8)
    classes[10:190, 0:80] = 1  # breast: rows 10..189, columns 0..79 (box 180 x 80)
    classes[80:120, 20:40] = 2  # FGT block 40 x 20
    classes[150, 70] = 2  # a one-pixel FGT speck
    old = fgt_roi_box(classes, 0.1, min_side=1)[0]
    # the speck stretches the FGT box to rows 80..150, columns 20..70 (71 x 51): margins round(7.1), round(5.1)
    assert (old.y0, old.x0, old.y1, old.x1) == (73, 15, 158, 76)
    rule = RoiRule(margin_fraction=0.1, breast_margin_fraction=0.1, min_fgt_fraction=0.001, min_side=1)
    box, source = fgt_roi_box(classes, rule=rule)
    # speck (1 px < 0.1 % of 14,400 breast px) dropped; margin max(10 % of 40 x 20, 10 % of 180 x 80) = 18 x 8
    assert source == "fgt" and (box.y0, box.x0, box.y1, box.x1) == (62, 12, 138, 48)
    clipped = fgt_roi_box(classes, rule=RoiRule(margin_fraction=0.5, clip_to_breast=True, min_side=1))[0]
    # 50 % of the 71 x 51 box (36 x 26 px) reaches beyond the breast's columns 0..79: clipped to them
    assert (clipped.y0, clipped.x0, clipped.y1, clipped.x1) == (44, 0, 187, 80)
    assert RoiRule.from_dict({"margin_fraction": 0.2, "min_side": 64, "crops_key": "x"}) == RoiRule(0.2)
    with pytest.raises(ValueError, match="breast_margin_fraction"):
        RoiRule(breast_margin_fraction=1.5)


def test_validation_scores_only_labelled_pixels():
    from mammo.core import distributed
    from mammo.training import engine

    class Fixed(torch.nn.Module):  # predicts class 2 (FGT) everywhere
        def forward(self, images):
            logits = torch.zeros(images.shape[0], 4, *images.shape[2:])
            logits[:, 2] = 5.0
            return logits

    mask = torch.tensor([[[2, 2, 1, ADIPOSE_OR_FGT], [IGNORE, IGNORE, 2, 1]]])
    loader = [{"image": torch.zeros(1, 1, 2, 4), "mask": mask}]
    args = argparse.Namespace(amp=False, max_batches_per_epoch=0)
    stats = engine.evaluate(Fixed(), TissueLoss(), loader, torch.device("cpu"), 4, args, distributed.DistContext())
    # 5 labelled pixels: 3 FGT (all right), 2 adipose (called FGT): FGT Dice 2*3/(5+3), accuracy 3/5
    assert stats["dice"][2] == pytest.approx(6 / 8) and stats["pixel_accuracy"] == pytest.approx(3 / 5)
    assert stats["dice"][1] == pytest.approx(0.0)


def test_dense_tissue_keeps_the_bright_half_of_the_fgt_region():
    classes = np.zeros((4, 6), np.uint8)
    classes[:, 1:5] = 2  # FGT region: columns 1..4
    classes[:, 5] = 1
    image = np.full((4, 6), 250, np.uint8)  # bright outside the region: must not count
    image[:, 1:3], image[:, 3:5] = 100, 200
    dense = imaging.dense_tissue(image, classes)
    assert dense[:, 3:5].all() and dense.sum() == 8  # the 200s; the 100s are fat inside the region
    assert not imaging.dense_tissue(image, np.ones((4, 6), np.uint8)).any()  # no FGT, no dense pixel
