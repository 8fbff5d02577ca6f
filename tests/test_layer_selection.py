"""Layer selection: the layers a flat network offers, and Units on in-place activations
against a slow reference (a copy without in-place ops, its seed written out by hand)."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import pullback_widgets as pw
from pullback_widgets.model_helpers import feature_layers


def _flat_net() -> nn.Module:
    """VGG in miniature: one flat Sequential whose BN outputs ReLUs overwrite in place."""
    torch.manual_seed(0)
    net = nn.Sequential()
    net.features = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
    net.pool = nn.AdaptiveAvgPool2d(1)
    net.flatten = nn.Flatten()
    net.head = nn.Linear(8, 5)
    for module in net.modules():  # non-trivial statistics, so that BN is not the identity
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2.0)
    return net.double().eval()


def test_flat_containers_offer_their_layers_with_shapes():
    net, x = _flat_net(), torch.rand(1, 3, 12, 12, dtype=torch.float64)
    layers = feature_layers(net, x)
    assert list(layers) == ["features"] + [f"features.{i}" for i in range(7)] + ["pool"]
    assert layers["features.2"] == (6, 12, 12) and layers["features.3"] == (6, 6, 6)
    assert layers["pool"] == (8, 1, 1)


def test_vgg11_bn_and_alexnet_offer_every_convolution_and_activation():
    x = torch.rand(1, 3, 64, 64)
    vgg = feature_layers(torchvision.models.vgg11_bn(num_classes=10).eval(), x)
    assert [f"features.{i}" for i in range(29)] == [n for n in vgg if n.startswith("features.")]
    assert vgg["features.0"] == (64, 64, 64) and vgg["features.28"] == (512, 2, 2)
    alexnet = feature_layers(torchvision.models.alexnet(num_classes=10).eval(), x)
    assert [f"features.{i}" for i in range(13)] == \
        [n for n in alexnet if n.startswith("features.")]


def test_deep_models_keep_a_short_list_unless_every_layer_is_asked_for():
    net, x = torchvision.models.resnet18(num_classes=10).eval(), torch.rand(1, 3, 32, 32)
    short, every = feature_layers(net, x), feature_layers(net, x, every=True)
    assert "layer1.0" in short and "layer1.0.conv1" not in short
    assert "layer1.0.conv1" in every and "layer1.0.bn2" in every
    assert set(short) < set(every)
    assert "layer1.0.relu" not in every  # it runs twice in its block: ambiguous, never offered


def _reference_unit_pullback(net, x, layer, channel, temperature, gate):
    """The slow way: a copy without in-place ops, the layer's output taken by a hook, and the
    Unit's seed (1 / (H·W) on every position of the channel) written out by hand."""
    reference = copy.deepcopy(net)
    for module in reference.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    taken = {}
    handle = dict(reference.named_modules())[layer].register_forward_hook(
        lambda module, args, output: taken.setdefault("output", output))
    leaf = x.clone().requires_grad_(True)
    try:
        with pw.soft_gating(reference, temperature=temperature, gate=gate):
            reference(leaf)
            output = taken["output"]
            seed = torch.zeros_like(output)
            height, width = output.shape[2:]
            for y in range(height):
                for x_ in range(width):
                    seed[:, channel, y, x_] = 1.0 / (height * width)
            (grad,) = torch.autograd.grad(output, leaf, seed)
    finally:
        handle.remove()
    return grad


@pytest.mark.parametrize("layer", ["features.1", "features.2", "features.5", "features.6"])
@pytest.mark.parametrize("gate,temperature", [("sigmoid", 0.3), ("normal_cdf", 1.5),
                                              ("hard", None)])
def test_unit_on_in_place_activation_matches_the_reference(layer, gate, temperature):
    # features.1 and .5 are batch-norm outputs that the next ReLU overwrites in place;
    # features.2 and .6 are those in-place ReLUs.
    net, x = _flat_net(), torch.rand(2, 3, 12, 12, dtype=torch.float64)
    session = pw.PullbackSession(net, x, layers=[layer])
    for channel in (0, 3):
        actual = session.pullback(pw.Unit(layer, channel), temperature=temperature, gate=gate)
        expected = _reference_unit_pullback(net, x, layer, channel, temperature, gate)
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
        # A soft gate lets every unit through a little: no test passes by comparing zeros.
        assert gate == "hard" or actual.abs().sum() > 0
    assert all(m.inplace for m in net.modules() if isinstance(m, nn.ReLU))
