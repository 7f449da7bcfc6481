"""Training losses of the cascade, built on segmentation-models-pytorch's losses.

- :class:`TissueLoss` (stage 1): ``dice_weight * soft Dice + ce_weight * cross-entropy`` over the four tissue
  classes (weights 0.5 / 0.5 by default).
- :class:`LesionLoss` (stage 2): ``dice_weight * soft Dice + bce_weight * binary cross-entropy`` on the lesion logit
  (weights 1 / 1 by default).
- :func:`l1_penalty`: ``l1_lambda * sum |w|`` over the weight tensors of convolutions and linear layers.

Empty-mask convention (smp's ``DiceLoss``, kept on purpose): Dice is computed over the whole batch per class
("batch Dice"), and a class with no true pixel anywhere in the batch contributes a Dice loss of 0, whatever the
prediction; the average still runs over all classes. So a batch of lesion-free crops has Dice loss 0 and is trained
by the cross-entropy term alone, which does penalise every false-positive pixel. The alternative (Dice of an empty
prediction on an empty truth = 1, of any prediction on an empty truth = 0) would make a single stray pixel cost the
whole Dice term and destabilise training on lesion-free images.

All losses are computed in float32, also under ``torch.autocast``: the logits are cast up and autocast is switched
off inside ``forward``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from mammo.core.labels import ADIPOSE, ADIPOSE_OR_FGT, FGT, IGNORE


class _DicePlusCrossEntropy(nn.Module):
    """``dice_weight * smp DiceLoss(mode) + ce_weight * cross_entropy``, in float32 whatever the autocast state."""

    def __init__(self, mode: str, cross_entropy, target_dtype: torch.dtype, dice_weight: float, ce_weight: float):
        super().__init__()
        self.dice_weight = float(dice_weight)
        self.ce_weight = float(ce_weight)
        self.dice = DiceLoss(mode=mode, from_logits=True)
        self.cross_entropy = cross_entropy
        self.target_dtype = target_dtype

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float(), target.to(self.target_dtype)
            return self.dice_weight * self.dice(logits, target) + self.ce_weight * self.cross_entropy(logits, target)


class TissueLoss(_DicePlusCrossEntropy):
    """Stage-1 loss: weighted multi-class soft Dice (smp ``DiceLoss(mode="multiclass")``) + cross-entropy, with
    partial labels.

    Targets may hold, besides the classes ``0..C-1``, the partial-label codes of :mod:`labels`:
    ``ADIPOSE_OR_FGT`` (4) and ``IGNORE`` (255). Where the target is ``ADIPOSE_OR_FGT`` the cross-entropy term is the
    marginal one, ``-log(p_adipose + p_FGT)`` (Shi et al., Med Image Anal 2021), and the Dice term leaves the pixel
    out; ``IGNORE`` pixels take no part in either term (smp's ``ignore_index``). The cross-entropy is the mean over
    the pixels that take part. On a fully labelled batch this is exactly ``dice_weight * DiceLoss + ce_weight *
    F.cross_entropy``.

    Args:
        dice_weight: weight of the Dice term (default 0.5, the cascade's recipe).
        ce_weight: weight of the cross-entropy term (default 0.5).

    Shape:
        - logits: ``(N, C, H, W)`` float (any dtype; computed in float32), C = 4.
        - target: ``(N, H, W)`` int64 codes in ``[0, C)`` or {4, 255}.
        - output: scalar float32 tensor.
    """

    def __init__(self, dice_weight: float = 0.5, ce_weight: float = 0.5):
        super().__init__("multiclass", F.cross_entropy, torch.long, dice_weight, ce_weight)
        self.dice = DiceLoss(mode="multiclass", from_logits=True, ignore_index=IGNORE)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits, target = logits.float(), target.long()
            partial = target >= logits.shape[1]
            if not bool(partial.any()):
                return self.dice_weight * self.dice(logits, target) + self.ce_weight * F.cross_entropy(logits, target)
            dice = self.dice(logits, target.masked_fill(partial, IGNORE))
            log_p = F.log_softmax(logits, dim=1)
            known = ~partial
            nll = -log_p.gather(1, target.masked_fill(partial, 0).unsqueeze(1)).squeeze(1)
            marginal = target == ADIPOSE_OR_FGT
            nll = torch.where(marginal, -torch.logsumexp(log_p[:, [ADIPOSE, FGT]], dim=1), nll)
            counted = known | marginal
            ce = (nll * counted).sum() / counted.sum().clamp(min=1)
            return self.dice_weight * dice + self.ce_weight * ce


class LesionLoss(_DicePlusCrossEntropy):
    """Stage-2 loss: weighted binary soft Dice (smp ``DiceLoss(mode="binary")``) + binary cross-entropy on logits.

    Args:
        dice_weight: weight of the Dice term (default 1.0).
        bce_weight: weight of the BCE term (default 1.0).

    Shape:
        - logits: ``(N, 1, H, W)`` float.
        - target: ``(N, 1, H, W)`` float (or bool/int) in {0, 1}.
        - output: scalar float32 tensor.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0):
        super().__init__("binary", F.binary_cross_entropy_with_logits, torch.float32, dice_weight, bce_weight)


def l1_penalty(model: nn.Module, l1_lambda: float) -> torch.Tensor:
    """L1 weight penalty ``l1_lambda * sum(|w|)`` over every parameter with two or more dimensions.

    Convolution and linear weights are penalised; biases and BatchNorm scales/shifts (1-D) are not, since shrinking
    them does not sparsify the network and only fights the normalisation. Returns a float32 scalar (0 when
    ``l1_lambda == 0``, without touching the parameters). For the ACA-ASPP ResUNet with its initial weights,
    ``sum |w|`` is about 5e5, so the default ``l1_lambda`` 5e-5 starts near 25 and is logged as its own term.
    """
    weights = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    if l1_lambda == 0 or not weights:
        return torch.zeros((), dtype=torch.float32, device=weights[0].device if weights else "cpu")
    return float(l1_lambda) * torch.stack([p.float().abs().sum() for p in weights]).sum()
