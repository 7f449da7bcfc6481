"""Hand-computed values of the losses and metrics, including the empty-mask conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from mammo.nn.losses import LesionLoss, TissueLoss, l1_penalty
from mammo.core.metrics import (binary_dice, binary_iou, confusion_counts, density_category, dice_per_class,
                                iou_per_class, percent_density, pixel_accuracy)


# ------------------------------------------------------------------------------------------------------- metrics
def test_per_class_dice_and_iou_by_hand():
    truth = np.array([[0, 0, 1, 1], [2, 2, 2, 3]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 0]])
    # class 0: |P|=3 |T|=2 |P∩T|=1 -> Dice 2/5, IoU 1/4; class 1: |P|=3 |T|=2 inter 2 -> 4/5, 2/3
    # class 2: |P|=2 |T|=3 inter 2 -> 4/5, 2/3; class 3: |P|=0 |T|=1 -> 0, 0
    assert dice_per_class(pred, truth, 4) == pytest.approx([0.4, 0.8, 0.8, 0.0])
    assert iou_per_class(pred, truth, 4) == pytest.approx([0.25, 2 / 3, 2 / 3, 0.0])
    assert pixel_accuracy(pred, truth) == pytest.approx(5 / 8)
    assert confusion_counts(pred, truth, 4).sum() == 8


def test_empty_mask_convention():
    empty = np.zeros((4, 4), bool)
    one = empty.copy()
    one[1, 1] = True
    assert binary_dice(empty, empty) == 1.0 and binary_iou(empty, empty) == 1.0
    assert binary_dice(one, empty) == 0.0 and binary_iou(empty, one) == 0.0
    # a class absent from both prediction and truth scores 1.0
    assert dice_per_class(np.zeros((2, 2), int), np.zeros((2, 2), int), 3) == pytest.approx([1.0, 1.0, 1.0])


def test_binary_metrics_by_hand_and_torch_inputs():
    pred = torch.tensor([[1, 1, 0], [0, 0, 0]])
    truth = torch.tensor([[1, 0, 0], [1, 0, 0]])
    assert binary_dice(pred, truth) == pytest.approx(2 * 1 / 4)
    assert binary_iou(pred, truth) == pytest.approx(1 / 3)


def test_metric_errors_name_the_problem():
    with pytest.raises(ValueError, match="outside"):
        dice_per_class(np.array([0, 5]), np.array([0, 1]), 4)
    with pytest.raises(ValueError, match="shape"):
        binary_dice(np.zeros(3), np.zeros(4))


def test_percent_density_excludes_background_and_pectoral():
    tissue = np.array([[0, 1, 1, 2], [3, 3, 2, 1]])  # adipose 3, FGT 2 -> 2 / 5
    assert percent_density(tissue) == pytest.approx(40.0)
    assert percent_density(np.zeros((3, 3), int)) == 0.0
    assert [density_category(v) for v in (0, 25, 25.1, 50, 60, 75, 90)] == ["A", "A", "B", "B", "C", "C", "D"]


# -------------------------------------------------------------------------------------------------------- losses
def test_tissue_loss_by_hand():
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 0, 0, 0] = math.log(3.0)  # pixel 0: softmax (1/2, 1/6, 1/6, 1/6)
    target = torch.tensor([[[0, 1]]])  # pixel 1: uniform 1/4 each
    ce = (-math.log(0.5) - math.log(0.25)) / 2
    p = [[0.5, 0.25], [1 / 6, 0.25], [1 / 6, 0.25], [1 / 6, 0.25]]
    dice0 = 2 * 0.5 / (p[0][0] + p[0][1] + 1)
    dice1 = 2 * 0.25 / (p[1][0] + p[1][1] + 1)
    # classes 2 and 3 are absent from the truth: their Dice loss counts as 0 (smp convention), mean over 4 classes
    dice_loss = ((1 - dice0) + (1 - dice1)) / 4
    assert TissueLoss()(logits, target).item() == pytest.approx(0.5 * dice_loss + 0.5 * ce, rel=1e-5)
    assert TissueLoss(dice_weight=1.0, ce_weight=0.0)(logits, target).item() == pytest.approx(dice_loss, rel=1e-5)


def test_lesion_loss_by_hand_and_on_empty_truth():
    logits = torch.tensor([0.0, 2.0]).view(1, 1, 1, 2)
    target = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    s = 1 / (1 + math.exp(-2.0))
    bce = (math.log(2.0) - math.log(1 - s)) / 2
    dice = 2 * 0.5 / (0.5 + s + 1)
    assert LesionLoss()(logits, target).item() == pytest.approx((1 - dice) + bce, rel=1e-5)
    # empty truth: the Dice term is 0 (convention), so the loss is BCE alone and still penalises false positives
    empty = torch.zeros_like(target)
    expected_bce = (math.log(2.0) - math.log(1 - s)) / 2
    assert LesionLoss()(logits, empty).item() == pytest.approx(expected_bce, rel=1e-5)
    assert (LesionLoss()(torch.full_like(logits, 5.0), empty).item()
            > LesionLoss()(torch.full_like(logits, -5.0), empty).item())


def test_losses_run_in_float32_under_autocast():
    logits = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16)
    target = torch.randint(0, 4, (2, 8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = TissueLoss()(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(TissueLoss()(logits.float(), target).item(), rel=1e-6)


def test_l1_penalty_counts_weights_not_biases_or_norms():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([-1.5, 2.0]).view(2, 1, 1, 1))
        model[0].bias.fill_(100.0)
    assert l1_penalty(model, 0.1).item() == pytest.approx(0.1 * 3.5)
    assert l1_penalty(model, 0.0).item() == 0.0
    loss = l1_penalty(model, 1.0)
    loss.backward()
    assert model[0].weight.grad.view(-1).tolist() == [-1.0, 1.0]
