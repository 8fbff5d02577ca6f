"""Models, targets and checkpoints a hostile user brings: each ends in the right pullback or a
clear one-line error, never a deep traceback or a pullback of the wrong classes."""

import pytest
import torch
import torchvision.models as tvm
from torch import nn

import pullback_widgets as pw
from pullback_widgets import models as registry


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 120)).eval()


@pytest.mark.parametrize("target", [b"cat", bytearray(b"cat"), memoryview(b"cat")])
def test_bytes_target_is_not_read_as_class_indices(target):
    # bytes are a Sequence of ints: b"cat" for a batch of 3 was silently the classes
    # 99, 97 and 116, a pullback of classes the user never named.
    x = torch.rand(3, 3, 8, 8)
    with pytest.raises(TypeError, match=r"got (bytes|bytearray|memoryview)"):
        pw.excitation_pullback(_small_net(), x, target)


def test_meta_tensor_target_is_a_clear_error():
    # Its values were read with .tolist(), which raised NotImplementedError deep in torch.
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="meta device"):
        pw.excitation_pullback(_small_net(), x, torch.tensor([1, 2], device="meta"))


def test_model_built_under_inference_mode_is_a_clear_error():
    # torch's message ("Inference tensors cannot be saved for backward") came from deep in
    # the engine's interception and read as if the inputs were at fault.
    with torch.inference_mode():
        model = _small_net()
    with pytest.raises(ValueError, match="inference_mode"):
        pw.excitation_pullback(model, torch.rand(1, 3, 8, 8), 1)


@pytest.mark.parametrize("state_dict", [{1: torch.zeros(1)}, {"conv1.weight": 3}],
                         ids=["int key", "int value"])
def test_checkpoint_of_odd_keys_or_values_names_the_file(tmp_path, monkeypatch, state_dict):
    # The error for a missing file asks users to put one there by hand; an int key ended in
    # an AttributeError inside load_state_dict, an int value passed for a wrong shape.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    path = registry._cache_path(tvm.ResNet50_Weights.IMAGENET1K_V1.url)
    path.parent.mkdir(parents=True)
    torch.save(state_dict, path)
    with pytest.raises(registry.WeightsUnavailableError, match="not layer names to tensors"):
        pw.load_model("resnet50")


def _fixed_size_net() -> nn.Module:
    """Takes 8 x 8 pictures only: a Linear after a flatten."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()


def test_a_picture_size_the_model_does_not_take_is_a_clear_error():
    # torch's "mat1 and mat2 shapes cannot be multiplied" came from deep inside the model,
    # with nothing to say that the picture's size was the cause.
    with pytest.raises(ValueError, match=r"inputs of 12 x 12 px may not suit this model.*"
                                         r"shapes cannot be multiplied"):
        pw.excitation_pullback(_fixed_size_net(), torch.rand(1, 3, 12, 12), 0)
    assert pw.excitation_pullback(_fixed_size_net(), torch.rand(1, 3, 8, 8), 0).shape == (
        1, 3, 8, 8)


def test_an_explorer_of_a_fixed_size_model_names_input_size():
    # The explorer shows pictures of the model's input_size (else 224): a model that takes
    # another size without saying so failed with torch's raw RuntimeError.
    with pytest.raises(ValueError, match="input_size"):
        pw.PullbackExplorer(_fixed_size_net(), torch.rand(1, 3, 8, 8))
    model = _fixed_size_net()
    model.input_size = 8
    explorer = pw.PullbackExplorer(model, torch.rand(1, 3, 8, 8))
    try:
        explorer.wait()
    finally:
        explorer.close()


def test_a_model_on_the_meta_device_asks_to_be_materialised():
    # "move one of them" (the inputs or the model) cannot help a model with no weights.
    with pytest.raises(ValueError, match="to_empty"):
        pw.excitation_pullback(_small_net().to("meta"), torch.rand(1, 3, 8, 8), 0)
