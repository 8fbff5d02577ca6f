"""A hostile user against the evaluation metrics and the dataset runner: each test failed before
its fix (a silent wrong value or missing row, a raw error from deep inside, or one that came
mid-run, after the run had written its first files)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import pullback_widgets as pw
from pullback_widgets import evaluation as ev
from pullback_widgets.evaluation import runner
from pullback_widgets.validation import PullbackWidgetsError, PullbackWidgetsTypeError
from tests.two_ranks import run_two_ranks


def _conv_net(seed: int = 0) -> nn.Module:
    """A small 3-class conv net in float64 that takes any image size."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).double().eval()


def _images(batch: int = 3, size: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, dtype=torch.float64, generator=generator)


class PixelReader(nn.Module):
    """No parameters: class 0's logit is ``scale`` times pixel (5, 5) of channel 0, the others
    0; computed in float32 whatever the images' dtype."""

    def __init__(self, scale: float = 10.0) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first = x[:, 0, 5, 5].float() * self.scale
        return torch.stack([first, torch.zeros_like(first), torch.zeros_like(first)], 1)


class PixelSum(nn.Module):
    """No parameters: class 0's logit is ``scale`` times the sum of all values, in float32."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = x.float().flatten(1).sum(1) * self.scale
        return torch.stack([total, torch.zeros_like(total)], 1)


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------- the metrics


def test_float16_maps_whose_channel_sums_overflow_are_ranked_as_their_values() -> None:
    # Summed in float16, both pixels' sums were inf: a tie, broken by position, so the
    # deletion removed (0, 0) first and the pixel that carries the class second.
    attribution = torch.zeros(1, 3, 6, 6, dtype=torch.float16)
    attribution[0, :, 0, 0] = 40000.0
    attribution[0, :, 5, 5] = 60000.0
    ranking = ev.ranking_map(attribution)
    assert torch.isfinite(ranking).all() and ranking[0, 5, 5] > ranking[0, 0, 0] > 0

    x = torch.zeros(1, 3, 6, 6, dtype=torch.float16)
    x[0, 0, 5, 5] = 1.0
    model = PixelReader()
    curve = ev.perturbation_curve(model, x, 0, attribution, baseline="mean", steps=36)
    exact = ev.perturbation_curve(model, x, 0, attribution.double(), baseline="mean", steps=36)
    torch.testing.assert_close(curve, exact.to(curve.dtype), rtol=0, atol=0)
    assert curve[0, 1] < curve[0, 0] / 2  # the first pixel deleted is the one that counts


def test_float16_infidelity_above_float16s_range_is_its_value_not_inf() -> None:
    # Computed in float64, then cast to the images' float16: 5e5 logit² became inf.
    model = PixelSum(scale=1000.0)
    x = torch.full((2, 3, 4, 4), 0.5)
    zero_map = torch.zeros_like(x)
    half = ev.infidelity(model, x.half(), 0, zero_map.half(), normalize=False)
    single = ev.infidelity(model, x, 0, zero_map, normalize=False)
    assert torch.isfinite(half).all() and (single > 65504).all()
    torch.testing.assert_close(half.double(), single.double(), rtol=2e-2, atol=0)


def test_ascent_gain_refuses_a_map_of_another_shape_or_nan() -> None:
    # A one-channel map broadcast over the three channels, a one-image map over the batch,
    # and a NaN map gave a gain (NaN for the last) without a word.
    model, x = _conv_net(), _images()

    def one_channel(model, x, target):
        return ev.gradient(model, x, target).sum(1, keepdim=True)

    def one_image(model, x, target):
        return ev.gradient(model, x[:1], target[:1])

    def nan_map(model, x, target):
        return torch.full_like(x, math.nan)

    for explain in (one_channel, one_image):
        with pytest.raises(PullbackWidgetsError, match="attribution must have the images' "
                                                       "shape"):
            ev.ascent_gain(model, x, 1, explain)
    with pytest.raises(PullbackWidgetsError, match="NaN"):
        ev.ascent_gain(model, x, 1, nan_map)


def test_ascent_gain_along_a_float64_map_of_float32_images() -> None:
    # The float64 map made the next image float64, which the float32 model refused.
    model, x = _conv_net().float(), _images().float()

    def float64_gradient(model, x, target):
        return ev.gradient(model, x, target).double()

    gain = ev.ascent_gain(model, x, 1, float64_gradient)
    torch.testing.assert_close(gain, ev.ascent_gain(model, x, 1, ev.gradient))


def test_the_randomisation_check_refuses_a_map_of_one_image_for_the_batch() -> None:
    # The one image's correlation came back as the whole batch's: (S, M, 1) for B = 3.
    model, x = _conv_net(), _images()

    def one_image(model, x, target):
        return ev.gradient(model, x[:1], target[:1])

    with pytest.raises(PullbackWidgetsError, match="method 'one': attribution must have"):
        ev.randomisation_check(model, x, 1, {"one": one_image})


# --------------------------------------------------------------------------- the runner


def test_a_label_past_the_models_classes_is_refused_before_anything_is_written(tmp_path):
    # It failed mid-run with torch's "index 7 is out of bounds" (on a GPU, a device-side
    # assert), after the settings and the parts folder were written.
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     targets="label", image_size=8, baseline="mean")
    items = [("fine", _images()[0], 2), ("beyond", _images()[1], 7)]
    with pytest.raises(PullbackWidgetsError, match="beyond: label 7 is not a class of the "
                                                   "model, which has 3"):
        ev.evaluate(items, settings, tmp_path / "r.csv", model=_conv_net(), progress=False)
    # An Item made directly holds its label unchecked: -1 would gather the last class.
    for label, error in ((-1, PullbackWidgetsError), ("cat", PullbackWidgetsTypeError),
                         (True, PullbackWidgetsTypeError)):
        with pytest.raises(error, match="odd: label must"):
            ev.evaluate([ev.Item("odd", _images()[0], label=label)], settings,
                        tmp_path / "r.csv", model=_conv_net(), progress=False)
    assert _files(tmp_path) == []


def test_numpy_numbers_in_the_settings_are_recorded_as_plain_numbers(tmp_path):
    # json.dumps raised a raw TypeError on the numpy int64 and float32.
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("infidelity",),
                                     targets="label", image_size=np.int64(8),
                                     perturbations=np.int64(4), noise_std=np.float32(0.25),
                                     seed=np.int64(3), temperature=np.float32(0.5))
    plain = ev.EvaluationSettings(methods=("gradient",), metrics=("infidelity",),
                                  targets="label", image_size=8, perturbations=4,
                                  noise_std=0.25, seed=3, temperature=0.5)
    assert settings == plain
    items = [("a", _images()[0], 1)]
    report = ev.evaluate(items, settings, tmp_path / "r.csv", model=_conv_net(),
                         progress=False)
    assert len(report.rows) == 1
    record = json.loads((tmp_path / "r.settings.json").read_text())
    assert record["settings"]["noise_std"] == 0.25 and record["settings"]["seed"] == 3
    with pytest.raises(PullbackWidgetsError, match="temperature must be a finite number > 0"):
        ev.EvaluationSettings(temperature=-1.0)
    with pytest.raises(PullbackWidgetsError, match="gate must be one of"):
        ev.EvaluationSettings(gate="step")


def test_a_method_returning_one_map_for_the_batch_is_refused_not_one_row(tmp_path):
    # Under the randomisation metric the one map was correlated with the one map of the
    # randomised copy: one row for three images, the run "complete"; a NaN map wrote NaN rows.
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("randomisation",),
                                     targets="label", image_size=8)
    items = [(f"i{i}", image, 1) for i, image in enumerate(_images())]

    def one_image(model, x, target):
        return ev.gradient(model, x[:1], target[:1])

    def nan_map(model, x, target):
        return torch.full_like(x, math.nan)

    with pytest.raises(PullbackWidgetsError, match="method 'one': attribution must have the "
                                                   r"images' shape \(3, 3, 8, 8\)"):
        ev.evaluate(items, settings, tmp_path / "one.csv", model=_conv_net(),
                    methods={"one": one_image}, progress=False)
    with pytest.raises(PullbackWidgetsError, match="method 'nan': attribution contains NaN"):
        ev.evaluate(items, settings, tmp_path / "nan.csv", model=_conv_net(),
                    methods={"nan": nan_map}, progress=False)


def test_an_empty_image_tensor_is_skipped_with_its_reason(tmp_path):
    # Its min() raised a RuntimeError that the loader does not skip: the run stopped.
    with pytest.raises(PullbackWidgetsError, match=r"empty: an image tensor must be float "
                                                   r"\(3, H, W\), got \(3, 0, 0\)"):
        ev.Item("empty", torch.rand(3, 0, 0)).load(8)
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     image_size=8, baseline="mean")
    items = [("empty", torch.rand(3, 0, 0)), ("fine", _images()[0])]
    report = ev.evaluate(items, settings, tmp_path / "r.csv", model=_conv_net(),
                         progress=False)
    assert [name for name, _ in report.skipped] == ["empty"]
    assert [row[0] for row in report.rows] == ["fine"]


def test_masks_are_checked_before_anything_is_written(tmp_path):
    # A float mask, a mask of another size than the run's (synthetic images made at 64 px,
    # run at 32: the image is resized, its mask is not) failed mid-run; masks of mixed sizes
    # that no metric reads failed in torch.stack.
    model = _conv_net()
    images = _images(size=8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:5, 2:5] = True
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("mass",), image_size=8)
    cases = [(mask.float(), PullbackWidgetsTypeError, "a mask must be a bool tensor"),
             (mask[:6, :6], PullbackWidgetsError, r"its mask is \(6, 6\), not the run's image "
                                                  r"size \(8, 8\)"),
             (torch.ones(8, 8, dtype=torch.bool), PullbackWidgetsError,
              "object and background")]
    for bad, error, message in cases:
        items = [ev.Item("fine", images[0], mask=mask), ev.Item("bad", images[1], mask=bad)]
        with pytest.raises(error, match=message):
            ev.evaluate(items, settings, tmp_path / "r.csv", model=model, progress=False)
        assert _files(tmp_path) == []
    synthetic = ev.synthetic_items(2, size=64)
    with pytest.raises(PullbackWidgetsError, match=r"not the run's image size \(32, 32\)"):
        ev.evaluate(synthetic, ev.EvaluationSettings(methods=("gradient",), metrics=("mass",),
                                                     image_size=32),
                    tmp_path / "s.csv", model=model, progress=False)
    assert _files(tmp_path) == []
    # Masks that no metric reads may be anything.
    unread = [ev.Item("a", images[0], mask=mask), ev.Item("b", images[1], mask=mask[:6, :6])]
    deletion = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     image_size=8, baseline="mean")
    report = ev.evaluate(unread, deletion, tmp_path / "d.csv", model=model, progress=False)
    assert [row[0] for row in report.rows] == ["a", "b"]


def test_a_model_without_parameters_is_evaluated(tmp_path):
    # next(model.parameters()) raised StopIteration after the settings were written.
    model = PixelReader()
    images = _images(batch=2, size=8).float()
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     image_size=8, baseline="mean", steps=4)
    report = ev.evaluate([("a", images[0]), ("b", images[1])], settings, tmp_path / "r.csv",
                         model=model, progress=False)
    classes = model(images).argmax(1)
    expected = ev.deletion_auc(model, images, classes, ev.gradient(model, images, classes),
                               baseline="mean", steps=4)
    assert [row[:4] for row in report.rows] == [("a", int(classes[0]), "gradient", "deletion"),
                                                ("b", int(classes[1]), "gradient", "deletion")]
    np.testing.assert_allclose([row[4] for row in report.rows], expected.numpy(), rtol=1e-6)


@pytest.mark.parametrize(("environment", "message"), [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE must be a whole number >= 1, got 'two'"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be a whole number >= 1, got '0'"),
    ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK must be a whole number >= 0, got '-1'"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK 2 is not below WORLD_SIZE 2"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK must be a whole number >= 0"),
])
def test_torchrun_variables_out_of_range_are_clear_errors_before_any_work(
        tmp_path, monkeypatch, environment, message):
    # A raw int() error, or torch's rendezvous error naming variables the user never set.
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     image_size=8, baseline="mean")
    with pytest.raises(PullbackWidgetsError, match=message):
        ev.evaluate([("a", _images()[0])], settings, tmp_path / "r.csv", model=_conv_net(),
                    progress=False)
    assert _files(tmp_path) == []


def test_a_registry_model_with_other_weights_does_not_resume_its_run(tmp_path):
    # Both were recorded by the name "shapes": the resume mixed rows of trained and random
    # weights without a word.
    items = ev.synthetic_items(2)
    settings = ev.EvaluationSettings(model="shapes", methods=("gradient",), metrics=("mass",),
                                     targets="label", image_size=64)
    out = tmp_path / "r.csv"
    ev.evaluate(items[:1], settings, out, model=pw.load_model("shapes"), progress=False)
    rows = out.read_text()
    torch.manual_seed(0)
    random_weights = pw.load_model("shapes", weights=None)
    with pytest.raises(PullbackWidgetsError, match=r"cannot resume .*\(model: 'shapes \(passed "
                                                   r"in, weights [0-9a-f]{12}\)' then"):
        ev.evaluate(items, settings, out, model=random_weights, resume=True, progress=False)
    assert out.read_text() == rows
    report = ev.evaluate(items, settings, out, model=pw.load_model("shapes"), resume=True,
                         progress=False)
    assert len(report.rows) == 2
    assert runner._model_record(pw.load_model("shapes")).startswith("shapes (passed in, weights ")


_OWN_GROUP = """
import sys, time, torch, pullback_widgets.evaluation as ev
from tests.test_evaluation import _relu6_net
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                     rank=rank, world_size=2)
if rank == 1:  # arrives late, as on a busy host: rank 0 has written its settings by now
    time.sleep(4)
images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
items = [(f"image-{i}", images[i], i % 3) for i in range(4)]
settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                 targets="label", image_size=16, steps=4)
report = ev.evaluate(items, settings, out, model=_relu6_net(), progress=False)
torch.distributed.destroy_process_group()
"""


def test_a_process_group_the_caller_started_without_torchruns_variables_shares_the_work(
        tmp_path):
    # Started with init_method="tcp://..." and no WORLD_SIZE or RANK in the environment, each
    # process read a world of one from the environment and ran every image itself. Then a
    # rank that came to evaluate() after rank 0 had written the run's settings found them
    # there and refused the run as someone else's (a CI run failed so).
    out = tmp_path / "r.csv"
    ranks = run_two_ranks(_OWN_GROUP, [str(out)], tmp_path)
    assert [status for status, _ in ranks] == [0, 0], [output for _, output in ranks]
    recorded = json.loads((tmp_path / "r.settings.json").read_text())
    assert recorded["world_size"] == 2
    assert sorted(row[0] for row in runner.read_rows(out)) == [f"image-{i}" for i in range(4)]


@pytest.mark.parametrize("methods, message", [
    ({"x": None}, r"method 'x' must be a function .* got NoneType"),
    ({"x": 3}, r"method 'x' must be a function .* got int"),
    ({1: pw.excitation_pullback}, r"a method's name must be a non-empty string, got 1"),
    ({"": pw.excitation_pullback}, r"a method's name must be a non-empty string, got ''"),
    (["gradient"], r"methods must map names to functions .* got list"),
])
def test_methods_passed_in_are_names_to_functions_or_refused_before_any_file(methods, message,
                                                                              tmp_path):
    # A method that is no function failed at its first call, after the run had written its
    # settings and parts folder (a rerun was then refused until they were removed by hand);
    # an unnamed one ran, and its rows had an empty method.
    settings = ev.EvaluationSettings(methods=("gradient",), metrics=("deletion",),
                                     image_size=8, baseline="mean")
    with pytest.raises(PullbackWidgetsTypeError, match=message):
        ev.evaluate([("a", _images()[0])], settings, tmp_path / "r.csv", model=_conv_net(),
                    methods=methods, progress=False)
    assert _files(tmp_path) == []
