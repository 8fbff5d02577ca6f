"""Hostile review of Unit targets, second round: a ViT's prefix tokens (class, distillation,
registers) against the patch a Unit names, at the grid's edges, in a batch; Units as dict keys;
odd index types; a channels-last norm whose rows equal its channels, and a unit's ascent past
an infinity elsewhere in its layer."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pullback_widgets as pw


def _reference(model, x, layer, value):
    """Autograd's plain gradient of ``value(layer's output)`` summed over the batch, the
    output read by a forward hook of the test's own."""
    recorded = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda module, args, output: recorded.append(output.clone()))
    leaf = x.clone().requires_grad_()
    try:
        model(leaf)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(value(recorded[0]).sum(), leaf)
    return grad


@pytest.mark.parametrize("kwargs", [
    dict(class_token=True, reg_tokens=3),
    dict(class_token=False, reg_tokens=2, global_pool="avg"),
    dict(class_token=False, global_pool="avg"),
])
def test_a_vit_unit_is_its_patch_tokens_channel_past_every_prefix_token(kwargs):
    # Registers sit between the class token and the patches, and without a class token the
    # patches may start at 0: every corner of a 2x4 grid, and the mean over patches only.
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=4,
                              img_size=(32, 64), depth=1, **kwargs).eval()
    x = torch.rand(2, 3, 32, 64)  # two examples: each its own token, never the other's
    prefix = model.num_prefix_tokens
    session = pw.PullbackSession(model, x, layers=["blocks.0"])
    assert session.token_grid == pw.targets.TokenGrid(prefix, 2, 4)
    for y, x_ in [(0, 0), (0, 3), (1, 0), (1, 3)]:
        expected = _reference(model, x, "blocks.0",
                              lambda out, t=prefix + 4 * y + x_: out[:, t, 5])
        got = session.pullback(pw.Unit("blocks.0", 5, y, x_), gate="hard")
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
    expected = _reference(model, x, "blocks.0", lambda out: out[:, prefix:, 5].mean(1))
    torch.testing.assert_close(session.pullback(pw.Unit("blocks.0", 5), gate="hard"),
                               expected, rtol=0, atol=0)
    for bad in (pw.Unit("blocks.0", 5, 2, 0), pw.Unit("blocks.0", 5, 0, 4),
                pw.Unit("blocks.0", 192)):
        with pytest.raises(pw.PullbackWidgetsError, match=r"outside|out of range"):
            session.pullback(bad)


def test_a_distilled_vits_unit_skips_both_the_class_and_the_distillation_token():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False,
                              num_classes=4, img_size=48, depth=1).eval()
    x = torch.rand(2, 3, 48, 48)
    assert model.num_prefix_tokens == 2
    expected = _reference(model, x, "norm", lambda out: out[:, 2 + 3 * 2 + 2, 7])
    torch.testing.assert_close(pw.excitation_pullback(model, x, pw.Unit("norm", 7, 2, 2),
                                                      gate="hard"), expected, rtol=0, atol=0)


def test_torchvision_vit_unit_addresses_patches_after_its_class_token():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32,
        num_classes=4).eval()
    x = torch.rand(2, 3, 32, 32)
    session = pw.PullbackSession(model, x)
    for unit, value in [
            (pw.Unit("encoder.layers.encoder_layer_0", 3, 3, 3), lambda out: out[:, 16, 3]),
            (pw.Unit("encoder.ln", 3), lambda out: out[:, 1:, 3].mean(1)),
            (pw.Unit("conv_proj", 3, 0, 3), lambda out: out[:, 3, 0, 3])]:
        expected = _reference(model, x, unit.layer, value)
        torch.testing.assert_close(session.pullback(unit, gate="hard"), expected,
                                   rtol=0, atol=0)


def test_units_made_of_other_integer_types_are_one_dict_key():
    # A dict of results keyed by Unit: numpy, tensor and Python ints name the same unit.
    results = {pw.Unit("conv", 3, 1, 2): "a", pw.Unit("conv", 3): "mean"}
    assert results[pw.Unit(np.str_("conv"), np.int64(3), torch.tensor(1), np.array(2))] == "a"
    assert results[pw.Unit("conv", torch.tensor(3, dtype=torch.uint8))] == "mean"
    assert pw.Unit("conv", 3, 0, 0) not in results  # a pixel is not the mean
    assert len({pw.Unit("conv", 3), pw.Unit("conv", np.int16(3), None, None)}) == 1
    unit = pw.Unit(np.str_("conv"), 3)
    assert type(unit.layer) is str and "np.str_" not in repr(unit)


@pytest.mark.parametrize("field", ["channel", "y"])
def test_a_meta_tensor_index_is_the_packages_own_error(field):
    # Was RuntimeError("Tensor.item() cannot be called on meta tensors") from inside torch.
    meta = torch.tensor(1, device="meta")
    fields = {"channel": meta} if field == "channel" else {"channel": 0, "y": meta, "x": 0}
    with pytest.raises(pw.PullbackWidgetsTypeError, match="meta device"):
        pw.Unit("conv", **fields)


@pytest.mark.parametrize("value", [1.0, np.float32(1), "1", None, np.array([1]), 1 + 0j])
def test_non_integer_channels_are_refused_as_such(value):
    with pytest.raises(pw.PullbackWidgetsTypeError, match="Unit channel must be an int"):
        pw.Unit("conv", value)


class _SquareConvNeXtLike(nn.Module):
    """timm's ConvNeXtBlock (conv_mlp=False) in little: permute inline, then a plain LayerNorm
    and an MLP on (B, H, W, C) maps, here with H == W == C (convnext_tiny's stage 0 at 384 px:
    96 x 96 x 96 channels)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 5, 2, stride=2)
        self.norm = nn.LayerNorm(5)
        self.mlp = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 5))
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        stem = self.stem(x)
        y = self.mlp(self.norm(stem.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head((stem + y).mean((2, 3)))


def test_a_channels_last_norm_whose_rows_equal_its_channels_is_refused_for_units():
    torch.manual_seed(0)
    model, x = _SquareConvNeXtLike().eval(), torch.rand(1, 3, 10, 10)
    for layer in ("norm", "mlp"):
        with pytest.raises(pw.PullbackWidgetsError, match="channels last"):
            pw.excitation_pullback(model, x, pw.Unit(layer, 1, 2, 3))


def test_an_infinity_elsewhere_in_the_layer_does_not_stop_a_units_ascent():
    conv = nn.Conv2d(3, 2, 1, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0] = 0.1
        conv.weight[1] = 3e38  # channel 1 overflows to inf on a white image
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(2, 2)).eval()
    x = torch.ones(1, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.isfinite(pw.excitation_pullback(model, x, pw.Unit("0", 0))).all()
        result = pw.pullback_ascent(model, x * 0.5, pw.Unit("0", 0), steps=1, progress=False)
    assert torch.isfinite(result.logits).all()
