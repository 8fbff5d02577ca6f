"""The explorers on the models users bring: a flat VGG's inner layers, a 1000-class model's
real class names, a model with nothing to gate (the notice), and ConvNeXt and EfficientNet-B0
with their soft gates. Random weights, small inputs."""

import threading
import warnings

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

import pullback_widgets as pw
from pullback_widgets import figures
from pullback_widgets.evaluation.runner import EvaluationSettings, gating_probe, summarise
from pullback_widgets.labels import IMAGENET_ASSUMED, class_names
from pullback_widgets.model_helpers import scaled_temperatures
from pullback_widgets.models import imagenet_labels
from pullback_widgets.report import explain, explain_html
from pullback_widgets.session import NO_GATED_OP
from pullback_widgets.widgets.common import LOGITS


def _sized(model: nn.Module, size: int) -> nn.Module:
    model.input_size = size
    return model.eval()


def _heatmap_z(figure) -> np.ndarray:
    return np.asarray(figure.data[0].z, dtype=np.float64)


def _assert_shows(explorer, target, **settings) -> None:
    image = explorer._images[explorer.image.value]
    pullback = pw.excitation_pullback(explorer.model, image, target, **settings)[0]
    np.testing.assert_allclose(_heatmap_z(explorer.pullback_figure),
                               figures.relative_map(pullback).astype(np.float32),
                               rtol=1e-4, atol=1e-5)


@pytest.fixture
def explorers():
    made = []
    yield made.append
    for explorer in made:
        explorer.close()


def test_vgg11_bn_offers_its_inner_layers_and_pulls_back_from_them(explorers):
    torch.manual_seed(0)
    net = _sized(torchvision.models.vgg11_bn(num_classes=10), 64)
    explorer = pw.PullbackExplorer(net, "chelsea", temperature=0.4)
    explorers(explorer)
    assert explorer.wait()
    labels = dict((value, label) for label, value in explorer.layer.options)
    assert [f"features.{i}" for i in range(29)] == \
        [v for v in labels if v.startswith("features.")]
    assert labels["features.28"] == "\u00a0\u00a0features.28 (512×2×2)"
    assert labels["features"] == "features (512×2×2)"
    explorer.layer.value = "features.2"  # an in-place ReLU
    explorer.channel.value = 7
    assert explorer.wait() and "⚠" not in explorer.status.value
    _assert_shows(explorer, pw.Unit("features.2", 7), temperature=0.4)
    assert explorer.labels == [f"class {i}" for i in range(10)]


def test_all_layers_shows_the_layers_inside_blocks_and_keeps_the_choice(explorers):
    net = _sized(torchvision.models.resnet18(num_classes=10), 32)
    explorer = pw.PullbackExplorer(net, "coffee", temperature=0.5)
    explorers(explorer)
    assert explorer.wait()
    short = [value for _, value in explorer.layer.options]
    assert "layer1.0" in short and "layer1.0.conv1" not in short
    explorer.layer.value = "layer2"
    explorer.all_layers.value = True
    every = [value for _, value in explorer.layer.options]
    assert set(short) < set(every) and explorer.layer.value == "layer2"
    explorer.layer.value = "layer1.0.conv1"
    explorer.channel.value = 3
    assert explorer.wait() and "⚠" not in explorer.status.value
    _assert_shows(explorer, pw.Unit("layer1.0.conv1", 3), temperature=0.5)
    explorer.all_layers.value = False  # the chosen layer is gone: back to the logits
    assert explorer.layer.value == LOGITS and explorer.channel.disabled


def test_a_1000_class_model_gets_imagenet_names_and_says_so_once(explorers):
    torch.manual_seed(0)
    net = _sized(torchvision.models.squeezenet1_1(), 64)
    explorer = pw.PullbackExplorer(net, "coffee")
    explorers(explorer)
    assert explorer.wait()
    assert explorer.labels == imagenet_labels()
    assert IMAGENET_ASSUMED in explorer.status.value
    assert explorer.top_buttons[0].description.split(" ")[0] in \
        {name.split(" ")[0] for name in imagenet_labels()}
    explorer.temperature.value = 1.0
    assert explorer.wait() and IMAGENET_ASSUMED not in explorer.status.value  # said once
    mine = [f"thing {i}" for i in range(1000)]
    given = pw.PullbackExplorer(net, "coffee", labels=mine)
    explorers(given)
    assert given.wait() and given.labels == mine
    assert IMAGENET_ASSUMED not in given.status.value
    ascent = pw.AscentExplorer(net, "coffee")
    explorers(ascent)
    assert ascent.labels == imagenet_labels() and IMAGENET_ASSUMED in ascent.status.value
    assert pw.AscentExplorer(net, "coffee", labels=mine).labels == mine


def test_labels_must_name_every_class():
    with pytest.raises(pw.PullbackWidgetsError, match="names 3 classes but the model has 10"):
        class_names(10, ["a", "b", "c"])
    with pytest.raises(TypeError, match="list of class names"):
        class_names(3, "abc")
    assert class_names(3) == (["class 0", "class 1", "class 2"], None)
    assert class_names(1000) == (imagenet_labels(), IMAGENET_ASSUMED)
    net = _sized(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                               nn.Flatten(), nn.Linear(4, 10)), 16)
    # Checked when the explorer is made, like its other arguments (the model loads there).
    threads = threading.active_count()
    with pytest.raises(pw.PullbackWidgetsError, match="names 3 classes"):
        pw.PullbackExplorer(net, "coffee", labels=["a", "b", "c"])
    assert threading.active_count() == threads  # no worker left behind


def _tanh_net() -> nn.Module:
    torch.manual_seed(0)
    return _sized(nn.Sequential(nn.Conv2d(3, 6, 3), nn.Tanh(), nn.Conv2d(6, 6, 3), nn.Tanh(),
                                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)), 24)


def test_a_model_with_nothing_to_gate_says_plain_gradient_and_disables_its_controls(
        explorers):
    net = _tanh_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explorer = pw.PullbackExplorer(net, "coffee")
        explorers(explorer)
        assert explorer.wait()
    assert "plain gradient" in explorer.status.value and "⚠" not in explorer.status.value
    assert explorer.temperature.disabled and explorer.gate.disabled
    assert explorer.strip_button.disabled and explorer.temperature_control.up.disabled
    assert explorer.pullback_figure.layout.title.text.startswith("Plain gradient of")
    assert "T =" not in explorer.pullback_figure.layout.title.text
    explorer.target.value = "class 2 (2)"
    assert explorer.wait() and "plain gradient" in explorer.status.value  # it stays
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ascent = pw.AscentExplorer(net, "coffee")
    explorers(ascent)
    assert "plain gradient" in ascent.status.value
    assert ascent.temperature.disabled and ascent.gate.disabled and ascent.method.disabled
    ascent.steps.value = 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ascent.run()
        assert ascent.wait()
    assert "gain" in ascent.status.value and "plain gradient" in ascent.status.value


def test_gated_models_keep_their_controls_and_show_no_notice(explorers):
    explorer = pw.PullbackExplorer(
        _sized(torchvision.models.resnet18(num_classes=10), 32), "coffee")
    explorers(explorer)
    assert explorer.wait()
    assert "plain gradient" not in explorer.status.value
    assert not explorer.temperature.disabled and not explorer.gate.disabled


def test_report_and_evaluation_carry_the_notice():
    net, image = _tanh_net(), torch.rand(1, 3, 24, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = explain(net, image, temperature=0.3, steps=1)
        assert explanation.notices == (NO_GATED_OP,)
        page = explain_html(explanation)
        assert "plain gradient" in page and "class 0" in page
        assert gating_probe(net, 24)[0] == (NO_GATED_OP,)
    relu_net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(3))
    relu_net(torch.rand(1, 3, 8, 8))
    assert gating_probe(relu_net.eval(), 8)[0] == ()
    settings = EvaluationSettings(methods=("gradient", "pullback"), metrics=("deletion",))
    text = summarise([("a", 0, "pullback", "deletion", 0.5)], settings, images=1,
                     notices=(NO_GATED_OP,))
    assert f"**Notice:** {NO_GATED_OP}." in text
    assert "Notice" not in summarise([("a", 0, "pullback", "deletion", 0.5)], settings,
                                     images=1)


def test_report_labels_given_win_and_1000_classes_are_assumed_imagenet():
    torch.manual_seed(0)
    net = _sized(torchvision.models.squeezenet1_1(), 64)
    explanation = explain(net, torch.rand(1, 3, 64, 64), temperature=0.3, steps=1)
    assumed = explain_html(explanation)
    assert IMAGENET_ASSUMED[1:] in assumed
    assert imagenet_labels()[explanation.target] in assumed
    mine = explain_html(explanation, [f"thing {i}" for i in range(1000)])
    assert f"thing {explanation.target}" in mine and IMAGENET_ASSUMED[1:] not in mine


@pytest.mark.parametrize("name,kinds", [("convnext_atto", {"gelu", "norm"}),
                                        ("efficientnet_b0", {"silu"})])
def test_modern_cnns_draw_soft_gated_pullbacks(name, kinds, explorers):
    torch.manual_seed(0)
    extra = {"ls_init_value": 1.0} if name.startswith("convnext") else {}
    net = _sized(timm.create_model(name, pretrained=False, num_classes=10, **extra), 64)
    explorer = pw.PullbackExplorer(net, "chelsea", temperature=0.8)
    explorers(explorer)
    assert explorer.wait()
    assert kinds <= set(explorer._session.gated_kinds)
    assert "plain gradient" not in explorer.status.value and "⚠" not in explorer.status.value
    target = int(explorer._session.logits[0].argmax())
    # The slider is the ReLU family's T; every other kind moves by the same factor.
    temperatures = scaled_temperatures(net, 0.8)
    _assert_shows(explorer, target, temperature=temperatures)
    assert not np.allclose(_heatmap_z(explorer.pullback_figure),
                           _heatmap_z(explorer.gradient_figure), atol=1e-3)
    stage = next(value for _, value in explorer.layer.options if value.startswith("stages.")
                 or value.startswith("blocks."))
    explorer.layer.value = stage
    assert explorer.wait() and "⚠" not in explorer.status.value
    _assert_shows(explorer, pw.Unit(stage, 0), temperature=temperatures)


class _HandAttention(nn.Module):
    """Convolution, ReLU, then attention over positions written as matmul-softmax-matmul."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.head = nn.Linear(4, 3)
        self.input_size = 24

    def forward(self, x):
        tokens = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (B, N, 4)
        weights = (tokens @ tokens.transpose(1, 2) / 2.0).softmax(dim=-1)
        return self.head((weights @ tokens).mean(1))


def test_attention_left_plain_is_said_in_both_explorers(explorers):
    net = _HandAttention().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explorer = pw.PullbackExplorer(net, "coffee")
        explorers(explorer)
        assert explorer.wait()
        ascent = pw.AscentExplorer(net, "coffee")
        explorers(ascent)
    for status in (explorer.status.value, ascent.status.value):
        assert "attention there stays plain" in status and "⚠" not in status, status
    assert not explorer.temperature.disabled  # the ReLU is gated: the controls still act
    assert "plain gradient" not in explorer.status.value
