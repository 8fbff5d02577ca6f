"""Hostile inputs to image loading, model loading, class names and model defaults (round 2).

One named test per case, each written against something that went wrong before: a user's
tensor written to by load_image, a warnings filter left behind by two threads, an image size
that asked for 157 GB, a damaged checkpoint in torch hub's cache that ended in a pickle
traceback, labels read with readlines() that no name could find, and a model attribute of 0
that divided the temperature slider by zero.
"""

from __future__ import annotations

import io
import os
import threading
import urllib.error
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.models as tvm
from PIL import Image
from torch import nn

from pullback_widgets import load_image, load_model
from pullback_widgets.images import MAX_SIZE
from pullback_widgets.labels import class_names, find_class
from pullback_widgets.model_helpers import (
    default_temperature,
    default_temperatures,
    scaled_temperatures,
)
from pullback_widgets.models import WeightsUnavailableError
from pullback_widgets.validation import PullbackWidgetsError, PullbackWidgetsTypeError


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("shape", [(3, 256, 256), (3, 256, 300), (1, 3, 256, 256)])
def test_a_tensor_at_the_resized_size_is_not_written_to(shape):
    # The resize to 256 and the crop change nothing, so the clamp ran in place on the caller's
    # tensor: its version moved, and a graph built on it could no longer be back-propagated.
    image = torch.rand(*shape, requires_grad=True)
    loss = (image * image).sum()  # saves `image` for its backward
    before = image.detach().clone()
    load_image(image)
    loss.backward()  # failed: "modified by an inplace operation"
    assert torch.equal(image.detach(), before)


def test_an_inference_tensor_and_an_expanded_tensor_load():
    with torch.inference_mode():
        inference = torch.rand(3, 256, 256)
    expanded = torch.rand(3, 1, 1).expand(3, 256, 256)  # one memory location per channel
    for image in (inference, expanded):  # both refused the in-place clamp with a RuntimeError
        assert load_image(image).shape == (1, 3, 224, 224)


def test_the_output_never_shares_memory_with_the_input():
    image = torch.rand(3, 3, 3)
    before = image.clone()
    out = load_image(image, size=3)  # round(3 / 0.875) == 3: nothing to resize or crop
    out.zero_()  # was a view of `image`
    assert torch.equal(image, before)


@pytest.mark.parametrize("make", [
    lambda: torch.rand(3, 8, 8).to_sparse(),
    lambda: torch.rand(3, 8, 8).to_sparse_csr(),
    lambda: torch.nested.nested_tensor([torch.rand(3, 8, 8)]),
])
def test_sparse_and_nested_tensors_are_clear_type_errors(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested tensors: a prototype warning
        image = make()
    with pytest.raises(PullbackWidgetsTypeError, match="must be a dense tensor"):
        load_image(image)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_a_float8_tensor_is_a_clear_type_error(dtype):
    # torch has no isfinite() (e4m3) or min() (e5m2) for them: a NotImplementedError before.
    with pytest.raises(PullbackWidgetsTypeError, match=r"convert it with \.float\(\)"):
        load_image(torch.rand(3, 8, 8).to(dtype))


def test_a_masked_array_is_refused_not_read_with_its_masked_values():
    data = np.full((8, 8, 3), 0.5)
    data[0, 0] = 7.0  # masked: it must not count, and must not be read as a pixel either
    with pytest.raises(PullbackWidgetsTypeError, match="masked array"):
        load_image(np.ma.masked_array(data, mask=data > 1))


def test_a_pathlike_that_gives_bytes_is_read_as_a_path(tmp_path: Path):
    path = tmp_path / "picture.png"
    array = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    path.write_bytes(_png(array))

    class BytesPath:
        def __fspath__(self) -> bytes:
            return os.fsencode(path)

    assert torch.equal(load_image(BytesPath()), load_image(path))  # was a bare TypeError
    with pytest.raises(PullbackWidgetsError, match="not found"):
        load_image(type("Missing", (), {"__fspath__": lambda self: b"/no/such/file.png"})())


@pytest.mark.parametrize("size", [MAX_SIZE + 1, 10**5, 2**40])
def test_a_huge_output_size_is_refused_before_any_work(size):
    # size=10**5 asked torch for 157 GB; 2**40 overflowed its storage size.
    with pytest.raises(PullbackWidgetsError, match=f"size must be <= {MAX_SIZE}"):
        load_image(np.zeros((8, 8)), size=size)


def test_loads_from_several_threads_leave_the_warnings_filters_as_they_were():
    data = _png(np.zeros((32, 32, 3), np.uint8))
    before = list(warnings.filters)
    errors = []

    def work() -> None:
        try:
            for _ in range(200):
                load_image(data, size=8)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    # Two catch_warnings blocks at once left "ignore DecompressionBombWarning" for good.
    assert list(warnings.filters) == before


# --------------------------------------------------------------------------- models


@pytest.mark.parametrize("weights", [np.array(["pretrained", "x"]), ["pretrained"], 1.0])
def test_weights_of_another_type_are_a_type_error(weights):
    with pytest.raises(PullbackWidgetsTypeError, match="weights must be 'pretrained'"):
        load_model("shapes", weights=weights)  # an array: "truth value ... is ambiguous"


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    (tmp_path / "checkpoints").mkdir()
    return tmp_path / "checkpoints" / tvm.ResNet50_Weights.IMAGENET1K_V1.url.split("/")[-1]


@pytest.mark.parametrize("content", ["empty", "html", "other keys", "a tensor"])
def test_a_damaged_checkpoint_in_the_cache_is_one_clear_error(offline_hub: Path, content):
    # What the error for missing weights asks for ("put it at ...") done wrong: a cut-off
    # copy, an HTML page saved by wget, another model's weights, something else torch saved.
    if content == "empty":
        offline_hub.write_bytes(b"")
    elif content == "html":
        offline_hub.write_bytes(b"<!DOCTYPE html><html><body>403 Forbidden</body></html>")
    elif content == "other keys":
        torch.save({"fc.weight": torch.zeros(2, 2)}, offline_hub)
    else:
        torch.save(torch.zeros(3), offline_hub)
    with pytest.raises(WeightsUnavailableError) as info:
        load_model("resnet50")
    message = str(info.value)
    assert "\n" not in message
    assert str(offline_hub) in message and "delete it" in message
    assert "weights_only=False" not in message  # torch's advice would run the file's code


# --------------------------------------------------------------------------- class names


def test_labels_read_with_readlines_are_found_by_name():
    labels = ["ant\n", "bee\n", "cat\n"]  # open("labels.txt").readlines()
    assert find_class("cat", labels) == 2  # was "unknown class 'cat'; did you mean 'cat\n'?"
    assert find_class(" Bee ", labels) == 1
    assert find_class("cat (2)", labels) == 2


def test_names_match_across_unicode_forms_and_case_folding():
    labels = ["Stra\u00dfe", "caf\u00e9", "\u00c9clair"]
    assert find_class("cafe\u0301", labels) == 1  # "e" + combining accent, as macOS types it
    assert find_class("STRASSE", labels) == 0
    assert find_class("E\u0301CLAIR", labels) == 2


@pytest.mark.parametrize("query", ["9" * 5000, "-" + "9" * 5000, "ant (" + "9" * 5000 + ")"])
def test_thousands_of_digits_are_a_package_error(query):
    with pytest.raises(PullbackWidgetsError):  # was a plain ValueError from int()
        find_class(query, ["ant", "bee"])


def test_labels_that_are_not_strings_are_compared_as_text():
    assert find_class("2", [0, 1, 2]) == 2
    assert find_class("bee", np.array(["ant", "bee"])) == 1
    with pytest.raises(PullbackWidgetsError, match="unknown class"):
        find_class("cat", [0, 1, 2])  # was AttributeError: 'int' object has no attribute


def test_a_models_own_labels_attribute_is_named_when_it_is_wrong():
    model = nn.Linear(2, 2)
    model.register_buffer("labels", torch.zeros(2))
    with pytest.raises(PullbackWidgetsTypeError, match=r"model\.labels must be .* pass labels="):
        class_names(2, None, model)
    other = nn.Linear(2, 2)
    other.labels = ["a", "b", "c"]
    with pytest.raises(PullbackWidgetsError, match=r"model\.labels names 3 classes"):
        class_names(2, None, other)
    assert class_names(2, ["x", "y"], model) == (["x", "y"], None)  # given labels win


# --------------------------------------------------------------------------- model defaults


@pytest.mark.parametrize(("value", "error"), [
    (0, PullbackWidgetsError), (-0.5, PullbackWidgetsError), (float("nan"), PullbackWidgetsError),
    (None, PullbackWidgetsTypeError), ("0.5", PullbackWidgetsTypeError),
    (True, PullbackWidgetsTypeError),
])
def test_a_bad_default_temperature_attribute_is_a_clear_error(value, error):
    model = nn.Linear(2, 2)
    model.default_temperature = value
    # 0 divided the explorers' slider scale by zero; None, a float() TypeError; "0.5" passed.
    for call in (default_temperature, default_temperatures,
                 lambda m: scaled_temperatures(m, 0.3)):
        with pytest.raises(error, match=r"model\.default_temperature must be"):
            call(model)
    model.default_temperature = np.float32(0.5)
    assert default_temperature(model) == 0.5


@pytest.mark.parametrize(("value", "error", "match"), [
    ({"relu": 0}, PullbackWidgetsError, r"default_temperatures\['relu'\] must be a finite"),
    ({"rleu": 0.5}, PullbackWidgetsError, "did you mean 'relu'"),
    ({"silu": "1"}, PullbackWidgetsTypeError, "must be a number"),
    ([("relu", 0.5)], PullbackWidgetsTypeError, "must be a dict"),
    (5, PullbackWidgetsTypeError, "must be a dict"),
])
def test_a_bad_default_temperatures_attribute_is_a_clear_error(value, error, match):
    model = nn.Linear(2, 2)
    model.default_temperatures = value
    with pytest.raises(error, match=match):
        scaled_temperatures(model, 0.3)  # ZeroDivisionError, TypeError, or a silent extra kind
    model.default_temperatures = {"silu": 2}
    assert default_temperatures(model)["silu"] == 2.0


@pytest.mark.parametrize("name", ["shapes", "efficientnet_lite0"])
def test_loading_pretrained_weights_leaves_the_global_random_state_alone(name):
    # The network is initialised at random before its weights replace that: the caller's
    # random numbers afterwards must be those they would have had without the load.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    try:
        load_model(name, weights="pretrained")
    except WeightsUnavailableError:
        pytest.skip(f"{name}'s weights are not installed")
    assert torch.equal(torch.rand(4), expected)
    # Random weights come from the caller's state, so that a seed reproduces them.
    torch.manual_seed(5)
    first = next(load_model("shapes", weights=None).parameters()).detach().clone()
    torch.manual_seed(5)
    assert torch.equal(next(load_model("shapes", weights=None).parameters()), first)
