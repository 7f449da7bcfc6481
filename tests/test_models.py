"""Shapes, gradients, size checks and weight loading of the networks in models.py (tiny tensors, CPU)."""

from __future__ import annotations

import urllib.error

import pytest
import torch

from mammo.nn import models
from mammo.nn.models import (ACAAtrousResUNet, ACAAtrousUNet, ACAModule, ASPP, DoubleConv, Down, Up, UNet, UpACA,
                             build_model, check_input_size, count_parameters, default_model_config, nearest_valid_size)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("hw", [(32, 32), (64, 32), (40, 24)])
def test_blocks_keep_or_halve_size(hw):
    h, w = hw
    x = torch.rand(2, 3, h, w)
    assert DoubleConv(3, 5, dropout=0.2)(x).shape == (2, 5, h, w)
    assert Down(3, 6)(x).shape == (2, 6, h // 2, w // 2)
    assert ASPP(3, 7)(x).shape == (2, 7, h, w)
    skip, gate = torch.rand(2, 4, h, w), torch.rand(2, 6, h, w)
    assert ACAModule(4, 6, reduction=2)(skip, gate).shape == (2, 4, h, w)
    low = torch.rand(2, 6, h // 2, w // 2)
    assert UpACA(6, 4, 9)(low, skip).shape == (2, 9, h, w)
    assert Up(6, 4, 9, bilinear=True)(low, skip).shape == (2, 9, h, w)
    assert Up(6, 4, 9, bilinear=False)(low, skip).shape == (2, 9, h, w)


def test_aspp_on_a_one_by_one_map_uses_only_centre_taps():
    aspp = ASPP(4, 3, rates=(1, 6)).eval()
    x = torch.rand(2, 4, 1, 1)
    out = aspp(x)
    assert out.shape == (2, 3, 1, 1)
    # On a 1x1 map every dilated 3x3 conv reduces to its centre weight: check one branch by hand.
    branch = aspp.branches[1]
    expected = torch.einsum("oc,nc->no", branch.weight[:, :, 1, 1], x[:, :, 0, 0])
    assert torch.allclose(branch(x)[:, :, 0, 0], expected, atol=1e-6)


def test_aca_residual_keeps_skip_when_attention_is_closed():
    """refined = skip * ca * sa + skip: with the spatial attention forced to 0 the fusion sees the skip alone."""
    aca = ACAModule(3, 2, reduction=1).eval()
    with torch.no_grad():
        aca.spatial_attention[2].weight.zero_()
        aca.spatial_attention[2].bias.fill_(-1e4)  # sigmoid -> 0
    skip, gate = torch.rand(1, 3, 8, 8), torch.rand(1, 2, 8, 8)
    assert torch.allclose(aca(skip, gate), aca.fuse(skip), atol=1e-6)


@pytest.mark.parametrize("model_cls", [UNet, ACAAtrousUNet, ACAAtrousResUNet])
@pytest.mark.parametrize("hw", [(512, 256), (64, 64), (32, 32)])
def test_models_return_logits_at_input_size(model_cls, hw):
    model = model_cls(in_channels=1, classes=4).eval()
    with torch.inference_mode():
        out = model(torch.rand(1, 1, *hw))
    assert out.shape == (1, 4, *hw)  # (32, 32) means a 1x1 bottleneck
    assert torch.isfinite(out).all()


def test_parameter_counts_are_reported(capsys):
    counts = {
        "UNet": count_parameters(UNet()),
        "ACAAtrousUNet": count_parameters(ACAAtrousUNet()),
        "ACAAtrousResUNet(resnet34, 4 classes)": count_parameters(ACAAtrousResUNet(classes=4)),
        "ACAAtrousResUNet(resnet34, 1 class)": count_parameters(ACAAtrousResUNet(classes=1)),
    }
    with capsys.disabled():
        print("\nparameter counts:", ", ".join(f"{k}={v:,}" for k, v in counts.items()))
    # ResNet34 (torchvision) has 21,797,672 parameters; minus the classifier (512 x 1000 + 1000) and two of the three
    # stem input channels (2 x 64 x 7 x 7) leaves 21,278,400 for the 1-channel encoder;
    # the heads differ by 3 output channels x (64 weights + 1 bias).
    encoder = models.make_encoder("resnet34", None, 1)
    assert count_parameters(encoder) == 21_278_400
    assert counts["ACAAtrousResUNet(resnet34, 4 classes)"] - counts["ACAAtrousResUNet(resnet34, 1 class)"] == 3 * 65


def test_every_parameter_of_the_resunet_gets_a_gradient():
    model = ACAAtrousResUNet(classes=4).train()
    out = model(torch.rand(2, 1, 64, 64))
    out.square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


@pytest.mark.parametrize("bad_hw, nearest", [((500, 300), "512x288"), ((960, 481), "960x480"), ((16, 64), "32x64")])
def test_non_multiple_of_32_names_the_nearest_valid_size(bad_hw, nearest):
    model = ACAAtrousResUNet(classes=1).eval()
    with pytest.raises(ValueError, match=nearest):
        model(torch.rand(1, 1, *bad_hw))


def test_nearest_valid_size_rounds_to_multiples_of_32():
    assert [nearest_valid_size(v) for v in (1, 15, 16, 47, 48, 500, 613)] == [32, 32, 32, 32, 64, 512, 608]
    check_input_size(64, 96)  # no error


def test_imagenet_offline_names_the_alternatives(monkeypatch):
    import segmentation_models_pytorch.encoders as smp_encoders

    def offline(*_args, **_kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(smp_encoders, "hf_hub_download", offline)
    monkeypatch.setattr(smp_encoders, "load_url", offline)
    with pytest.raises(RuntimeError, match=r"--encoder-weights none.*--encoder-weights /path/to/weights.pth"):
        ACAAtrousResUNet(encoder_weights="imagenet")


def test_encoder_weights_from_a_local_file(tmp_path):
    """A 3-channel (torchvision-style) state dict is summed to one channel; a suite checkpoint gives its encoder."""
    rgb = models.make_encoder("resnet34", None, 3)
    state = {k: v for k, v in rgb.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)  # torchvision files carry the classifier: it must be ignored
    path = tmp_path / "resnet34_rgb.pth"
    torch.save(state, path)
    model = ACAAtrousResUNet(encoder_weights=str(path), classes=1)
    assert torch.allclose(model.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    assert torch.equal(model.encoder.layer4[2].conv2.weight, state["layer4.2.conv2.weight"])

    suite_ckpt = tmp_path / "best_stage1.pth"
    torch.save({"model": model.state_dict(), "stage": 1}, suite_ckpt)
    again = ACAAtrousResUNet(encoder_weights=str(suite_ckpt), classes=4)
    assert torch.equal(again.encoder.conv1.weight, model.encoder.conv1.weight)

    with pytest.raises(FileNotFoundError, match="'imagenet'"):
        ACAAtrousResUNet(encoder_weights=str(tmp_path / "missing.pth"))
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="no encoder weights"):
        ACAAtrousResUNet(encoder_weights=str(tmp_path / "other.pth"))


def test_build_model_from_plain_config_round_trips():
    config = default_model_config(classes=1)
    model = build_model(config)
    assert isinstance(model, ACAAtrousResUNet)
    clone = build_model(dict(config))
    clone.load_state_dict(model.state_dict())
    x = torch.rand(1, 1, 64, 32)
    with torch.inference_mode():
        assert torch.equal(model.eval()(x), clone.eval()(x))
    assert isinstance(build_model({"name": "unet", "classes": 2, "base_channels": 8}), UNet)
    with pytest.raises(ValueError, match="unknown model name"):
        build_model({"name": "segformer"})
    with pytest.raises(ValueError, match="does not fit"):
        build_model({"name": "unet", "depth": 9})
