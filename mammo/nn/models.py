"""Segmentation networks of the cascade: plain U-Net, ACA + ASPP U-Net, and the ACA-ASPP ResUNet.

Every model takes a batch of grayscale mammograms and returns logits at the input's size:

Shape:
    - input: ``(N, in_channels, H, W)`` float32 (float16/bfloat16 under autocast), intensities in [0, 1];
      ``H`` and ``W`` must be multiples of 32 (five 2x downsamplings); otherwise :func:`check_input_size`
      raises a ``ValueError`` naming the nearest valid size. We raise rather than pad internally, because the
      suite already letterboxes every image to a valid network size (``imaging.letterbox``) and a silent pad
      would hide a geometry bug there.
    - output: ``(N, classes, H, W)`` float logits (no softmax / sigmoid).

Building blocks follow the design of the cascade (``../shared/DESIGN.md``):

- ``DoubleConv`` / ``Down`` / ``Up`` / ``UNet``: the U-Net of Ronneberger et al., MICCAI 2015 (with BatchNorm).
- ``ASPP``: atrous spatial pyramid pooling with dilation rates (1, 6, 12, 18), as in DeepLab v3
  (Chen et al., arXiv:1706.05587, rates for output stride 16).
- ``ACAModule``: attention that refines a skip connection with channel attention (squeeze-and-excitation style,
  Hu et al., CVPR 2018) and spatial attention (attention-gate style, Oktay et al., MIDL 2018), both computed from
  the concatenation of the skip and the decoder ("gate") tensor.
- ``ACAAtrousResUNet``: a ResNet34 encoder from segmentation-models-pytorch's encoder factory, ASPP on the
  deepest feature map, four ``UpACA`` decoder blocks over the encoder's skips, and a 1x1 head.

``build_model(config)`` rebuilds any of them from a plain ``dict`` (the form checkpoints store). This module does
no file I/O except reading encoder weights from a path the caller names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Total downsampling factor of every model here (five stride-2 stages); H and W must be multiples of it.
OUTPUT_STRIDE = 32

#: Dilation rates of the ASPP branches (DeepLab v3, Chen et al. 2017, output stride 16 setting).
ASPP_RATES = (1, 6, 12, 18)

#: Channel reduction ratio inside the ACA attention branches (the SE-Net default, Hu et al. 2018).
ACA_REDUCTION = 8


def nearest_valid_size(size: int, multiple: int = OUTPUT_STRIDE) -> int:
    """Round ``size`` (pixels) to the nearest positive multiple of ``multiple`` (ties go up)."""
    return max(multiple, int((size + multiple / 2) // multiple) * multiple)


def check_input_size(height: int, width: int, multiple: int = OUTPUT_STRIDE) -> None:
    """Raise if a network input of ``height`` x ``width`` pixels cannot pass through the model.

    Raises:
        ValueError: when a side is not a positive multiple of ``multiple``; the message names the nearest valid
            size and the way to get there (letterbox the image with ``imaging.letterbox``).
    """
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise ValueError(
            f"input size {height}x{width} (HxW) is not a multiple of {multiple}; the nearest valid size is "
            f"{nearest_valid_size(height, multiple)}x{nearest_valid_size(width, multiple)}. Resize or letterbox "
            f"the image to it (imaging.letterbox does this and inverts it exactly)."
        )


class DoubleConv(nn.Sequential):
    """Two (3x3 conv -> BatchNorm -> ReLU) layers, with optional ``Dropout2d`` between them.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int, mid_channels: int | None = None, dropout: float = 0.0):
        mid = mid_channels or out_channels
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
        ]
        if dropout > 0:
            layers.append(nn.Dropout2d(dropout))
        layers += [nn.Conv2d(mid, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                   nn.ReLU(inplace=True)]
        super().__init__(*layers)


class Down(nn.Sequential):
    """2x2 max-pool then :class:`DoubleConv`. Shape: ``(N, C_in, H, W)`` -> ``(N, C_out, H/2, W/2)``."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels, dropout=dropout))


class Up(nn.Module):
    """Upsample the decoder tensor to the skip's size, concatenate the skip, then :class:`DoubleConv`.

    Args:
        in_channels: channels of the decoder tensor coming from below.
        skip_channels: channels of the encoder skip.
        out_channels: channels produced.
        bilinear: bilinear upsampling (True) or a learned 2x2 transposed convolution (False).

    Shape: decoder ``(N, in_channels, h, w)`` and skip ``(N, skip_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, bilinear: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.bilinear = bilinear
        if not bilinear:
            self.up = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(in_channels + skip_channels, out_channels, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        if self.bilinear:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        else:
            x = self.up(x)
            if x.shape[-2:] != skip.shape[-2:]:
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([skip, x], dim=1))


class ACAModule(nn.Module):
    """Attention that refines an encoder skip with channel and spatial attention gated by the decoder.

    ``z = concat(skip, gate)``; channel attention ``ca = sigmoid(W2 relu(W1 avgpool(z)))`` (1x1 convs, reduce by
    ``reduction`` then expand to ``skip_channels``); spatial attention ``sa = sigmoid(V2 relu(V1 z))`` (3x3 conv that
    reduces by ``reduction``, then a 1x1 conv to one map); ``refined = skip * ca * sa + skip`` (the residual keeps the
    skip's information where attention is near zero); then a 1x1 conv + BatchNorm + ReLU fuses the result.

    Args:
        skip_channels: channels of the skip tensor (and of the output).
        gate_channels: channels of the decoder tensor, already upsampled to the skip's size.
        reduction: channel reduction ratio of both attention branches (default 8, :data:`ACA_REDUCTION`).

    Shape: skip ``(N, skip_channels, H, W)``, gate ``(N, gate_channels, H, W)`` -> ``(N, skip_channels, H, W)``.
    """

    def __init__(self, skip_channels: int, gate_channels: int, reduction: int = ACA_REDUCTION):
        super().__init__()
        joint = skip_channels + gate_channels
        hidden = max(joint // reduction, 8)
        self.channel_attention = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(joint, hidden, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, skip_channels, 1),
            nn.Sigmoid(),
        )
        self.spatial_attention = nn.Sequential(
            nn.Conv2d(joint, hidden, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, 1, 1),
            nn.Sigmoid(),
        )
        self.fuse = nn.Sequential(nn.Conv2d(skip_channels, skip_channels, 1, bias=False),
                                  nn.BatchNorm2d(skip_channels), nn.ReLU(inplace=True))

    def forward(self, skip: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        joint = torch.cat([skip, gate], dim=1)
        refined = skip * self.channel_attention(joint) * self.spatial_attention(joint) + skip
        return self.fuse(refined)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: parallel dilated 3x3 convolutions, concatenated, projected by a 1x1 conv.

    Each branch is a 3x3 convolution with dilation ``r`` and padding ``r`` (so the size is kept); the branch outputs
    are concatenated, normalised (BatchNorm + ReLU) and projected with 1x1 conv + BatchNorm + ReLU.

    Args:
        in_channels: channels of the input feature map.
        out_channels: channels of each branch and of the output.
        rates: dilation rates (default (1, 6, 12, 18), DeepLab v3).

    Shape: ``(N, in_channels, H, W)`` -> ``(N, out_channels, H, W)``; works down to ``H = W = 1`` (then the dilated
    taps fall on zero padding and every branch reduces to its centre weight).
    """

    def __init__(self, in_channels: int, out_channels: int, rates: Sequence[int] = ASPP_RATES):
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, out_channels, 3, padding=int(r), dilation=int(r), bias=False) for r in rates
        )
        self.norm = nn.Sequential(nn.BatchNorm2d(out_channels * len(rates)), nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(out_channels * len(rates), out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.norm(torch.cat([branch(x) for branch in self.branches], dim=1)))


class UpACA(nn.Module):
    """Decoder block: upsample to the skip's size, refine the skip with :class:`ACAModule`, concatenate, DoubleConv.

    All submodules are created here from the known channel counts, so the optimizer sees every parameter at once
    (no lazily built layers, no dummy forward pass).

    Shape: decoder ``(N, in_channels, h, w)`` and skip ``(N, skip_channels, H, W)`` -> ``(N, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, reduction: int = ACA_REDUCTION,
                 dropout: float = 0.0):
        super().__init__()
        self.aca = ACAModule(skip_channels, in_channels, reduction)
        self.conv = DoubleConv(in_channels + skip_channels, out_channels, dropout=dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.conv(torch.cat([self.aca(skip, x), x], dim=1))


class _SizeChecked(nn.Module):
    """Base class: checks the input size before the subclass's ``_forward``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            check_input_size(int(x.shape[-2]), int(x.shape[-1]))
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


class UNet(_SizeChecked):
    """Plain U-Net from scratch: DoubleConv stem, five ``Down`` stages, five ``Up`` stages, 1x1 head.

    Args:
        in_channels: image channels (1 for mammograms).
        classes: output channels (4 tissue classes, or 1 for lesion logits).
        base_channels: channels of the first stage, doubled per stage up to 16x (default 32).
        bilinear: bilinear upsampling (True) or transposed convolutions (False).
        dropout: ``Dropout2d`` probability inside the deepest DoubleConv.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, classes, H, W)``, H and W multiples of 32.
    """

    def __init__(self, in_channels: int = 1, classes: int = 4, base_channels: int = 32, bilinear: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        widths = [base_channels * 2**min(i, 4) for i in range(6)]  # 32, 64, 128, 256, 512, 512
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(
            Down(widths[i], widths[i + 1], dropout=dropout if i == 4 else 0.0) for i in range(5)
        )
        self.ups = nn.ModuleList(Up(widths[i + 1], widths[i], widths[i], bilinear) for i in reversed(range(5)))
        self.head = nn.Conv2d(widths[0], classes, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = skips.pop()
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


class ACAAtrousUNet(_SizeChecked):
    """U-Net from scratch with an ASPP bottleneck and ACA-refined skips (no pretrained encoder).

    Encoder: DoubleConv stem then five ``Down`` stages (strides 2..32); ASPP on the deepest map; five ``UpACA``
    blocks; 1x1 head.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, classes, H, W)``, H and W multiples of 32.
    """

    def __init__(self, in_channels: int = 1, classes: int = 4, base_channels: int = 32,
                 rates: Sequence[int] = ASPP_RATES, reduction: int = ACA_REDUCTION, dropout: float = 0.0):
        super().__init__()
        widths = [base_channels * 2**min(i, 4) for i in range(6)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1]) for i in range(5))
        self.aspp = ASPP(widths[5], widths[4], rates)
        decoder_in = [widths[4], widths[4], widths[3], widths[2], widths[1]]
        self.ups = nn.ModuleList(
            UpACA(decoder_in[j], widths[4 - j], widths[4 - j], reduction, dropout if j == 0 else 0.0) for j in range(5)
        )
        self.head = nn.Conv2d(widths[0], classes, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        x = self.aspp(skips.pop())
        for up in self.ups:
            x = up(x, skips.pop())
        return self.head(x)


class ACAAtrousResUNet(_SizeChecked):
    """The cascade's network: ResNet34 encoder + ASPP bottleneck + four ACA decoder blocks + 1x1 head.

    The encoder comes from segmentation-models-pytorch's encoder factory (``smp.encoders.get_encoder``), so any smp
    encoder name works (default ``"resnet34"``). With encoder channels ``(C0, 64, 64, 128, 256, 512)`` at strides
    ``(1, 2, 4, 8, 16, 32)`` (ResNet34), ASPP maps the stride-32 map (512) to the previous stage's channel count
    (256); four ``UpACA`` blocks then climb to stride 2 over the skips at strides 16, 8, 4, 2 (the output of each
    block has the skip's channel count); the 1x1 head produces logits at stride 2, bilinearly upsampled to the input
    size (a full-resolution decoder stage would cost more than the rest of the decoder for no visible gain on
    mammograms at 512 px).

    Args:
        encoder_name: smp encoder name (default ``"resnet34"``).
        encoder_weights: ``"imagenet"`` (downloads, so needs a network or a filled cache), ``None`` (random init),
            or a path to a local file: an encoder ``state_dict`` (3- or ``in_channels``-channel first conv; fc
            weights ignored) or a checkpoint of this suite (``{"model": state_dict, ...}``; its ``encoder.*`` weights
            are used, e.g. to start stage 2 from stage 1).
        in_channels: image channels (default 1).
        classes: output channels.
        rates: ASPP dilation rates.
        reduction: ACA reduction ratio.
        dropout: ``Dropout2d`` probability in the first (deepest) decoder block.

    Raises:
        RuntimeError: ``encoder_weights="imagenet"`` cannot be fetched (offline); the message names ``None`` and a
            local path as the alternatives.
        FileNotFoundError / ValueError: a weights path that is missing or holds no matching encoder weights.

    Shape: ``(N, in_channels, H, W)`` -> ``(N, classes, H, W)``, H and W multiples of 32.
    """

    def __init__(self, encoder_name: str = "resnet34", encoder_weights: str | None = None, in_channels: int = 1,
                 classes: int = 4, rates: Sequence[int] = ASPP_RATES, reduction: int = ACA_REDUCTION,
                 dropout: float = 0.0):
        super().__init__()
        self.encoder = make_encoder(encoder_name, encoder_weights, in_channels)
        channels = list(self.encoder.out_channels)  # (C0, 64, 64, 128, 256, 512) for resnet34
        self.aspp = ASPP(channels[5], channels[4], rates)
        self.decoder = nn.ModuleList(
            UpACA(channels[5 - j] if j else channels[4], channels[4 - j], channels[4 - j], reduction,
                  dropout if j == 0 else 0.0)
            for j in range(4)
        )
        # j=0: ASPP output (256) with skip 256 -> 256; j=1: 256 + 128 -> 128; j=2: 128 + 64 -> 64; j=3: 64 + 64 -> 64
        self.head = nn.Conv2d(channels[1], classes, 1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        y = self.aspp(features[5])
        for block, skip in zip(self.decoder, (features[4], features[3], features[2], features[1])):
            y = block(y, skip)
        return F.interpolate(self.head(y), size=x.shape[-2:], mode="bilinear", align_corners=False)


def make_encoder(encoder_name: str, encoder_weights: str | None, in_channels: int) -> nn.Module:
    """Build an smp encoder (depth 5) with weights from ImageNet, nowhere, or a local file.

    See :class:`ACAAtrousResUNet` for the accepted ``encoder_weights`` and the errors raised.
    """
    from segmentation_models_pytorch.encoders import get_encoder

    if encoder_weights in (None, "", "none", "None"):
        return get_encoder(encoder_name, in_channels=in_channels, depth=5, weights=None)
    if encoder_weights == "imagenet":
        try:
            return get_encoder(encoder_name, in_channels=in_channels, depth=5, weights="imagenet")
        except Exception as error:  # network, hub and cache errors all mean the same thing to the user
            raise RuntimeError(
                f"could not load ImageNet weights for encoder {encoder_name!r} ({type(error).__name__}: {error}). "
                "Without a network, use --encoder-weights none (random initialisation) or --encoder-weights "
                "/path/to/weights.pth (a local encoder state_dict, e.g. torchvision's resnet34 weights, or a "
                "checkpoint of this suite such as best_stage1.pth)."
            ) from error
    return _encoder_from_file(encoder_name, Path(encoder_weights), in_channels)


def _encoder_from_file(encoder_name: str, path: Path, in_channels: int) -> nn.Module:
    from segmentation_models_pytorch.encoders import get_encoder

    if not path.is_file():
        raise FileNotFoundError(
            f"encoder weights file {path} not found; pass an existing file, 'imagenet' (needs a network) or 'none'"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # a checkpoint of this suite
        state = {k[len("encoder."):]: v for k, v in state["model"].items() if k.startswith("encoder.")}
    elif isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    first = state.get("conv1.weight")
    if first is None:
        raise ValueError(
            f"{path} holds no encoder weights for {encoder_name!r} (no 'conv1.weight' / 'encoder.conv1.weight' key); "
            "pass an encoder state_dict, a checkpoint of this suite, 'imagenet' or 'none'"
        )
    file_channels = int(first.shape[1])
    encoder = get_encoder(encoder_name, in_channels=file_channels, depth=5, weights=None)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not match encoder {encoder_name!r}: {error}") from error
    if file_channels != in_channels:
        encoder.set_in_channels(in_channels, pretrained=True)  # smp sums RGB filters for one channel
    return encoder


#: Names accepted by :func:`build_model` and the class each builds.
MODEL_REGISTRY = {"unet": UNet, "aca_atrous_unet": ACAAtrousUNet, "aca_atrous_resunet": ACAAtrousResUNet}


def default_model_config(classes: int, encoder_name: str = "resnet34", encoder_weights: str | None = None) -> dict:
    """The cascade's model config for a stage: ACA-ASPP ResUNet, one input channel, ``classes`` outputs."""
    return {
        "name": "aca_atrous_resunet",
        "encoder_name": encoder_name,
        "encoder_weights": encoder_weights,
        "in_channels": 1,
        "classes": classes,
        "rates": list(ASPP_RATES),
        "reduction": ACA_REDUCTION,
        "dropout": 0.0,
    }


def build_model(config: dict) -> nn.Module:
    """Build a model from a plain config dict (as stored in checkpoints).

    Args:
        config: ``{"name": one of MODEL_REGISTRY, **constructor keyword arguments}``, e.g. the output of
            :func:`default_model_config`.

    Raises:
        ValueError: unknown ``name`` or constructor arguments the model does not take.
    """
    config = dict(config)
    name = config.pop("name", "aca_atrous_resunet")
    if name not in MODEL_REGISTRY:
        raise ValueError(f"unknown model name {name!r}; choose one of {sorted(MODEL_REGISTRY)}")
    try:
        return MODEL_REGISTRY[name](**config)
    except TypeError as error:
        raise ValueError(f"model config {config} does not fit {name!r}: {error}") from error


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
