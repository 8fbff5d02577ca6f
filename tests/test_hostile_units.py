"""Hostile review of Unit targets and layer recording: bools dressed as tensors, and 4-D maps
laid out channels last inside an otherwise channels-first model (ConvNeXt's blocks)."""

import warnings

import pytest
import torch
import torchvision
from torch import nn

import pullback_widgets as pw
from pullback_widgets.model_helpers import feature_layers


@pytest.mark.parametrize("value", [torch.tensor(True), torch.tensor([3]), torch.tensor([[1]])])
def test_a_unit_refuses_bool_and_non_scalar_tensors(value):
    # operator.index read tensor(True) as channel 1 and tensor([3]) as 3, silently.
    for field in ({"channel": value}, {"channel": 0, "y": value, "x": 0}):
        with pytest.raises(pw.PullbackWidgetsTypeError, match="must be an int, got a torch"):
            pw.Unit("layer", **field)
    assert pw.Unit("layer", torch.tensor(3), torch.tensor(1, dtype=torch.uint8), 2) == \
        pw.Unit("layer", 3, 1, 2)


class _ConvNeXtLike(nn.Module):
    """A ConvNeXt block with its permute inline (timm's style): norm and MLP run on (B, H, W, C)
    maps whose H equals neither C nor the hidden width."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.norm = nn.LayerNorm(6)
        self.mlp = nn.Sequential(nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        stem = self.stem(x)
        y = self.mlp(self.norm(stem.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head((stem + y).mean((2, 3)))


def test_channels_last_maps_inside_a_channels_first_model_are_neither_offered_nor_targeted():
    # ConvNeXt's block.1 ... block.5 output (B, H, W, C): they were offered as (H, W, C), the
    # Channel box bounded by the rows, and Unit(..., 5) pulled back row 5 of every channel.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convnext = torchvision.models.convnext_tiny(num_classes=3).eval()
        x = torch.rand(1, 3, 64, 64)
        offered = feature_layers(convnext, x, every=True)
        assert offered["features.1.0.block.0"] == (96, 16, 16)
        assert offered["features.1.0.block.6"] == (96, 16, 16)
        for i in range(1, 6):
            assert f"features.1.0.block.{i}" not in offered
        for i in (1, 4):
            with pytest.raises(pw.PullbackWidgetsError, match=r"channels last \(B, H, W, C\)"):
                pw.excitation_pullback(convnext, x, pw.Unit(f"features.1.0.block.{i}", 5))
        with pytest.raises(pw.PullbackWidgetsError, match="channels last"):
            pw.pullback_ascent(convnext, x, pw.Unit("features.1.0.block.3", 5), steps=1,
                               progress=False)
    pw.excitation_pullback(convnext, x, pw.Unit("features.1.0.block.6", 5))
    assert not any(module._forward_hooks for module in convnext.modules())

    model, x = _ConvNeXtLike().eval(), torch.rand(2, 3, 10, 10)
    assert set(feature_layers(model, x, every=True)) == {"stem"}
    session = pw.PullbackSession(model, x, layers=["stem"])
    for layer in ("norm", "mlp", "mlp.0", "mlp.1", "mlp.2"):
        with pytest.raises(pw.PullbackWidgetsError, match="channels last"):
            session.pullback(pw.Unit(layer, 2, 1, 1))
    assert session.pullback(pw.Unit("stem", 2, 1, 1)).shape == x.shape  # still usable
    assert not any(module._forward_hooks for module in model.modules())


def test_a_vit_layer_off_the_patch_grid_or_laid_out_channels_last_is_refused_for_units():
    # timm's patch embedding at dynamic sizes outputs (B, h, w, C) and says so (output_fmt);
    # q_norm's output is per head (B, heads, N, d). Both were accepted as (B, C, H, W): a Unit
    # read patch rows (or heads) as channels, 135 % off the channel's gradient (a review).
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5,
                              img_size=64, depth=1, dynamic_img_size=True).eval()
    x = torch.rand(1, 3, 64, 64)
    session = pw.PullbackSession(model, x, layers=["patch_embed", "blocks.0.attn.q_norm",
                                                   "patch_embed.proj"])
    with pytest.raises(pw.PullbackWidgetsError, match="laid out channels last"):
        session.pullback(pw.Unit("patch_embed", 3))
    with pytest.raises(pw.PullbackWidgetsError, match=r"not a .B, C, H, W. map on this vision"):
        session.pullback(pw.Unit("blocks.0.attn.q_norm", 1))
    # The convolution's own map is on the grid: its Unit is its channel's plain gradient.
    recorded = []
    handle = model.patch_embed.proj.register_forward_hook(lambda m, a, out: recorded.append(out))
    leaf = x.clone().requires_grad_()
    model(leaf)
    handle.remove()
    (expected,) = torch.autograd.grad(recorded[0][:, 3].mean(), leaf)
    torch.testing.assert_close(session.pullback(pw.Unit("patch_embed.proj", 3), gate="hard"),
                               expected, rtol=0, atol=0)
    assert {"patch_embed", "blocks.0.attn.q_norm"}.isdisjoint(feature_layers(model, x))
