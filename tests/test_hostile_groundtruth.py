"""A hostile user against the ground truth, the metrics, the shapes data and their neighbours:
each test failed before its fix (a wrong score, a deep traceback, a file or a random state of the
user's changed)."""

from __future__ import annotations

import copy
import json
import math
import pickle

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

import pullback_widgets as pw
from pullback_widgets import app, report, synthetic
from pullback_widgets.evaluation import gradient, metrics, random_attribution
from pullback_widgets.evaluation import ground_truth as gt
from pullback_widgets.paper import PAPER_LATEST, PAPER_V1, PaperSettings
from pullback_widgets.validation import PullbackWidgetsError, PullbackWidgetsTypeError


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return pw.load_model("shapes")


def _masks(size: int = 32) -> torch.Tensor:
    masks = torch.zeros(1, size, size, dtype=torch.bool)
    masks[0, 8:13, 8:13] = True
    return masks


# --------------------------------------------------------------------------- the mask metrics


def test_a_map_whose_channels_cancel_everywhere_points_nowhere() -> None:
    # The map scored is |attribution.sum(1)|: zero everywhere here, although no channel is.
    # Its "peak" was the first pixel, a hit whenever the mask covered it.
    masks = torch.zeros(1, 32, 32, dtype=torch.bool)
    masks[0, :6, :6] = True
    attribution = torch.zeros(1, 3, 32, 32)
    attribution[0, 0, 20, 20], attribution[0, 1, 20, 20] = 1.0, -1.0
    assert gt.pointing_game(attribution, masks).tolist() == [0.0]
    assert gt.mask_mass(attribution, masks).tolist() == [0.0]


def test_the_pointing_game_does_not_depend_on_the_maps_scale() -> None:
    # Both channel sums overflowed to inf in float64, and the first inf in raster order (off
    # the object) won over the larger value on it.
    attribution = torch.zeros(1, 3, 32, 32, dtype=torch.float64)
    attribution[0, :, 10, 10] = 1e308  # on the object
    attribution[0, :, 20, 20] = 0.7e308
    masks = _masks()
    assert gt.pointing_game(attribution / 1e300, masks).tolist() == [1.0]
    assert gt.pointing_game(attribution, masks).tolist() == [1.0]
    # and a map of subnormal values points where the same map scaled up does
    assert gt.pointing_game(attribution / 1e308 * 1e-320, masks).tolist() == [1.0]


def test_the_pointing_game_against_a_blurred_argmax_on_random_maps() -> None:
    import torchvision.transforms.functional as TF

    g = torch.Generator().manual_seed(5)
    attribution = torch.randn(6, 3, 24, 24, generator=g, dtype=torch.float64)
    masks = torch.rand(6, 24, 24, generator=g) < 0.3
    result = gt.pointing_game(attribution, masks, sigma=1.5)
    for b in range(6):
        saliency = attribution[b].sum(0).abs()[None, None]
        blurred = TF.gaussian_blur(saliency, [11, 11], [1.5, 1.5])[0, 0]
        y, x = divmod(int(blurred.flatten().argmax()), 24)
        assert result[b] == float(masks[b, y, x])


def test_mask_metrics_refuse_what_they_cannot_score_with_clear_errors() -> None:
    attribution, masks = torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16) < 0.5
    for metric in (gt.mask_mass, gt.pointing_game, gt.mask_auc):
        with pytest.raises(PullbackWidgetsTypeError, match="real"):
            metric(attribution.to(torch.complex64), masks)  # was the real part, silently
        with pytest.raises(PullbackWidgetsError, match="at least one image"):
            metric(attribution[:0], masks[:0])  # was an IndexError
        with pytest.raises(PullbackWidgetsError, match="meta"):
            metric(attribution.to("meta"), masks)  # was a RuntimeError
        with pytest.raises(PullbackWidgetsTypeError):
            metric(attribution.numpy(), masks)
        with pytest.raises(PullbackWidgetsTypeError, match="bool"):
            metric(attribution, masks.to(torch.uint8))


# --------------------------------------------------------------------------- intervals, verdicts


def test_wilson_intervals_stay_inside_0_1_at_every_n() -> None:
    # At 0 or n hits the bound was -3e-17 or 1.0000000000000002 for many n.
    for n in range(1, 200):
        for hits in (0, n):
            interval = gt.Interval.proportion(torch.tensor([1.0] * hits + [0.0] * (n - hits)))
            assert 0.0 <= interval.low <= interval.mean <= interval.high <= 1.0
            assert interval.low == 0.0 if hits == 0 else interval.high == 1.0


def test_intervals_of_nothing_are_refused() -> None:
    with pytest.raises(PullbackWidgetsError, match="at least one value"):
        gt.Interval.proportion(torch.tensor([]))  # was a ZeroDivisionError
    with pytest.raises(PullbackWidgetsError, match="at least one value"):
        gt.Interval.of(torch.tensor([]))
    with pytest.raises(PullbackWidgetsTypeError):
        gt.Interval.of([0.5, 0.6])  # type: ignore[arg-type]
    one = gt.Interval.of(torch.tensor([0.5]))  # no spread to estimate: no interval
    assert one.mean == 0.5 and math.isnan(one.low) and math.isnan(one.high)
    assert not one.excludes_zero()


def _scores(*means: float, n: int = 6) -> dict[str, torch.Tensor]:
    return {metric: torch.full((n,), mean, dtype=torch.float64)
            for metric, mean in zip(gt.METRICS, means)}


def test_result_lookups_name_what_is_missing() -> None:
    result = gt.GroundTruthResult({"gradient": _scores(0.2, 0.0, 0.6),
                                   "random": _scores(0.1, 0.0, 0.5)}, 1.0, 6, 0)
    with pytest.raises(PullbackWidgetsError, match="no method 'nope'"):
        result.interval("nope", "mass")  # was a KeyError
    with pytest.raises(PullbackWidgetsError, match="did you mean 'mask_auc'"):
        result.interval("gradient", "auc")
    with pytest.raises(PullbackWidgetsError, match="did you mean 'mask_auc'"):
        result.difference("gradient", "random", "auc")
    with pytest.raises(PullbackWidgetsError, match=r"no method .pullback sigmoid T=0\.01."):
        gt.curve_table(result)
    with pytest.raises(PullbackWidgetsError, match="at least one temperature"):
        gt.recommended_temperature(result, temperatures=())  # was max() of nothing


def test_a_nan_mean_is_never_the_largest_or_the_recommended() -> None:
    nan = {metric: torch.tensor([math.nan, 0.5, 0.5], dtype=torch.float64)
           for metric in gt.METRICS}
    curve = [gt.pullback_name(t) for t in (0.1, 0.3)]
    result = gt.GroundTruthResult({curve[0]: nan, curve[1]: _scores(0.3, 1.0, 0.7, n=3),
                                   "gradient": _scores(0.2, 0.0, 0.6, n=3),
                                   "random": _scores(0.1, 0.0, 0.5, n=3)}, 1.0, 3, 0)
    assert gt.recommended_temperature(result, temperatures=(0.1, 0.3)) == 0.3
    best = gt.verdict(result)[2]
    assert "nan" not in best and best.count(curve[1]) == 3, best
    only_nan = gt.GroundTruthResult({curve[0]: nan}, 1.0, 3, 0)
    with pytest.raises(PullbackWidgetsError, match="NaN"):
        gt.recommended_temperature(only_nan, temperatures=(0.1,))


# --------------------------------------------------------------------------- Grad-CAM, benchmark


def test_grad_cam_of_a_frozen_model_is_that_of_the_trainable_one(model) -> None:
    images, labels, _ = synthetic.make_dataset(2, seed=1)
    expected = gt.grad_cam("res2.conv2")(model, images, labels)
    frozen = copy.deepcopy(model).requires_grad_(False)
    # "element 0 of tensors does not require grad" before
    torch.testing.assert_close(gt.grad_cam("res2.conv2")(frozen, images, labels), expected)
    assert not any(p.requires_grad for p in frozen.parameters())
    with pytest.raises(PullbackWidgetsError, match="B, C, H, W"):
        gt.grad_cam("head")(model, images, labels)
    with pytest.raises(PullbackWidgetsError, match="not a module"):
        gt.grad_cam("nope")(model, images, labels)


def test_benchmark_methods_are_checked_where_they_are_named(model) -> None:
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 4))
    with pytest.raises(PullbackWidgetsError, match="Conv2d"):
        gt.ground_truth_methods(linear, captum=False)  # was an IndexError
    with pytest.raises(PullbackWidgetsError, match=r"cam_layer 'res2\.conv3'.*'res2\.conv2'"):
        gt.ground_truth_methods(model, cam_layer="res2.conv3", captum=False)
    with pytest.raises(PullbackWidgetsTypeError, match="mapping"):
        gt.ground_truth_benchmark(model, ["gradient"], n=2)  # type: ignore[arg-type]
    with pytest.raises(PullbackWidgetsTypeError, match="method 'g'"):
        gt.ground_truth_benchmark(model, {"g": "gradient"}, n=2)  # type: ignore[dict-item]
    with pytest.raises(PullbackWidgetsTypeError, match="method 'bad'"):
        gt.ground_truth_benchmark(model, {"bad": lambda m, x, t: x.numpy()}, n=2)
    with pytest.raises(PullbackWidgetsError, match=r"method 'bad'.*NaN"):
        gt.ground_truth_benchmark(model, {"bad": lambda m, x, t: x * math.nan}, n=2)
    odd = copy.deepcopy(model)
    odd.input_size = (64, 64)
    with pytest.raises(PullbackWidgetsTypeError, match="input_size"):
        gt.ground_truth_benchmark(odd, {"random": random_attribution}, n=2)


def test_benchmark_of_a_model_without_parameters() -> None:
    class Mean(nn.Module):  # 4 logits, no parameters: a StopIteration before
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3)).repeat(1, 2)[:, :4]

    result = gt.ground_truth_benchmark(Mean(), {"random": random_attribution}, n=3)
    assert result.n == 3 and result.scores["random"]["mass"].shape == (3,)


# --------------------------------------------------------------------------- the other metrics


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 3)).eval()


def test_metric_errors_are_the_packages_own() -> None:
    net, x = _tiny_model(), torch.rand(2, 3, 40, 40)
    attribution = torch.randn(2, 3, 40, 40)
    with pytest.raises(PullbackWidgetsError, match="images' shape"):
        metrics.deletion_auc(net, x, None, attribution[:1], steps=2)
    with pytest.raises(PullbackWidgetsTypeError, match="real"):  # was a RuntimeError from sort
        metrics.deletion_auc(net, x, None, attribution.to(torch.complex64), steps=2)
    with pytest.raises(PullbackWidgetsError, match="NaN"):  # every curve was NaN
        metrics.deletion_auc(net, x, None, attribution, steps=2,
                             baseline=torch.full((3, 1, 1), math.nan))
    with pytest.raises(PullbackWidgetsError, match="smooth"):
        metrics.ranking_map(attribution, smooth=20)
    with pytest.raises(PullbackWidgetsTypeError, match="seed"):  # was a RuntimeError
        metrics.infidelity(net, x, None, attribution, seed=1.5, n_perturbations=2)
    with pytest.raises(PullbackWidgetsError, match="seed"):
        metrics.infidelity(net, x, None, attribution, seed=2**70, n_perturbations=2)
    with pytest.raises(PullbackWidgetsTypeError, match="real"):
        metrics.spearman(attribution.to(torch.complex64), attribution)
    # a negative seed draws as it did
    first = metrics.infidelity(net, x, None, attribution, seed=-3, n_perturbations=2)
    assert torch.equal(first, metrics.infidelity(net, x, None, attribution, seed=-3,
                                                 n_perturbations=2))


def test_spearman_of_an_example_holding_nan_is_nan_as_scipys() -> None:
    a = torch.tensor([[1.0, math.nan, 3.0, 2.0], [1.0, math.inf, 3.0, 2.0]])
    b = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 3.0]])
    result = metrics.spearman(a, b)
    for row in range(2):
        expected = spearmanr(a[row].numpy(), b[row].numpy()).statistic
        assert math.isnan(expected) == math.isnan(float(result[row]))  # was 0.5 with a NaN
        if not math.isnan(expected):
            assert math.isclose(float(result[row]), expected, rel_tol=1e-12)
    assert math.isnan(float(metrics.spearman(b, a)[0]))


def test_randomisation_stages_given_by_hand() -> None:
    net, x = _tiny_model(), torch.rand(1, 3, 32, 32)
    named = nn.Sequential()
    named.add_module("conv", net[0])
    named.add_module("relu", net[1])
    named.add_module("pool", net[2])
    named.add_module("flat", net[3])
    named.add_module("fc", net[4])
    # A bare name is one stage (it was read as the stages 'f' and 'c').
    result = metrics.randomisation_check(named, x, None, {"g": gradient}, stages="fc")
    assert result.stages == ["fc"]
    with pytest.raises(PullbackWidgetsError, match="at least one module"):
        metrics.randomisation_check(named, x, None, {"g": gradient}, stages=[])
    with pytest.raises(PullbackWidgetsError, match="at least one module"):
        metrics.randomisation_check(named, x, None, {"g": gradient}, stages=["fc", []])

    class Mean(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean((2, 3))

    with pytest.raises(PullbackWidgetsError, match="no parameters"):
        metrics.randomisation_check(Mean(), x, None, {"g": gradient})  # was a StopIteration
    assert isinstance(metrics.randomised_copy(Mean()), Mean)


# --------------------------------------------------------------------------- the shapes


def test_training_leaves_the_callers_random_state_alone() -> None:
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    net, _ = synthetic.train(steps=1, batch_size=2, test_size=1, seed=5)
    assert torch.equal(torch.get_rng_state(), before)  # it was torch.manual_seed(5)'s state
    again, _ = synthetic.train(steps=1, batch_size=2, test_size=1, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                   again.state_dict().values()))


def test_train_command_keeps_the_users_files(tmp_path, capsys) -> None:
    args = ["train", "--steps", "1", "--batch-size", "2", "--threads", "1"]
    # --out NAME.json: the provenance was written over the weights just saved there.
    assert synthetic._main([*args, "--out", str(tmp_path / "net.json")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "net.json").exists()
    # A folder: "exists; pass --overwrite", and with it an IsADirectoryError.
    (tmp_path / "folder").mkdir()
    assert synthetic._main([*args, "--overwrite", "--out", str(tmp_path / "folder")]) == 2
    # The user's NET.json beside the weights was replaced without --overwrite, and NET.tmp
    # was taken as the temporary file.
    notes, scratch = tmp_path / "net.json", tmp_path / "net.tmp"
    notes.write_text("my notes")
    scratch.write_text("my scratch")
    assert synthetic._main([*args, "--out", str(tmp_path / "net.pt")]) == 2
    assert "net.json exists" in capsys.readouterr().err
    assert notes.read_text() == "my notes" and not (tmp_path / "net.pt").exists()
    notes.unlink()
    assert synthetic._main([*args, "--out", str(tmp_path / "net.pt")]) == 0
    assert scratch.read_text() == "my scratch"
    assert json.loads(notes.read_text())["steps"] == 1
    assert synthetic.load_weights(tmp_path / "net.pt").head.out_features == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder", "net.json", "net.pt",
                                                          "net.tmp"]


# --------------------------------------------------------------------------- paper, app, report


def test_paper_presets_copy_pickle_and_hash() -> None:
    for preset in (PAPER_V1, PAPER_LATEST):
        assert pickle.loads(pickle.dumps(preset)) == preset  # mappingproxy could not
        assert copy.deepcopy(preset) == preset
        assert copy.deepcopy(dict(preset))["temperature"] == dict(preset["temperature"])
        assert hash(preset) == hash(PaperSettings(**preset))
    with pytest.raises(TypeError):
        PAPER_V1["temperature"]["relu"] = 1.0  # type: ignore[index]
    with pytest.raises(PullbackWidgetsTypeError, match="mapping"):
        PaperSettings(gate="sigmoid", temperature=0.3, pool_weights="detached")  # type: ignore


def test_app_notebook_of_the_wrong_type() -> None:
    with pytest.raises(PullbackWidgetsTypeError, match="notebook"):
        app.serve_classroom(123, port=1)  # type: ignore[arg-type]


def test_the_report_explains_one_image(model) -> None:
    images, _, _ = synthetic.make_dataset(2, seed=0)
    with pytest.raises(PullbackWidgetsError, match="one image"):
        report.explain(model, images, steps=1)
