"""The synthetic shapes, the shipped shapes CNN, and the ground-truth benchmark's metrics against
slow textbook references (a pixel loop for the mass, pairwise counts and scikit-learn for the
AUC, the definition of the pointing game on constructed maps, Captum for Grad-CAM)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.measure import regionprops
from sklearn.metrics import roc_auc_score
from torch import nn

import pullback_widgets as pw
from pullback_widgets import synthetic
from pullback_widgets.evaluation import ground_truth as gt
from pullback_widgets.evaluation import random_attribution
from pullback_widgets.validation import PullbackWidgetsError, PullbackWidgetsTypeError

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "ground_truth.md"


@pytest.fixture(scope="module")
def shapes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return synthetic.make_dataset(200, seed=3)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return pw.load_model("shapes")


# --------------------------------------------------------------------------- the data


def test_dataset_contract(shapes) -> None:
    images, labels, masks = shapes
    assert images.shape == (200, 3, 64, 64) and images.dtype == torch.float32
    assert labels.shape == (200,) and labels.dtype == torch.long
    assert masks.shape == (200, 64, 64) and masks.dtype == torch.bool
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    assert set(labels.tolist()) == set(range(len(synthetic.CLASSES)))
    area = masks.flatten(1).float().mean(1)
    assert float(area.min()) > 0.01 and float(area.max()) < 0.4
    # The object never touches the border: it is fully inside the image.
    border = masks[:, 0].any(1) | masks[:, -1].any(1) | masks[:, :, 0].any(1) \
        | masks[:, :, -1].any(1)
    assert not border.any()


def test_the_mask_is_exactly_the_object(shapes) -> None:
    images, _, masks = shapes
    for image, mask in zip(images, masks):
        painted = image[:, mask]  # (3, pixels): one colour
        assert torch.equal(painted, painted[:, :1].expand_as(painted))
        # It stands out from the background: at least 0.25 per channel from the base colour,
        # which the texture moves by at most 0.12.
        ring = torch.nn.functional.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0] > 0
        around = image[:, ring & ~mask].median(dim=1).values
        assert float((painted[:, 0] - around).abs().max()) > 0.1


def test_labels_are_the_shapes_geometry(shapes) -> None:
    """Each class by its textbook geometry: solidity (area / convex hull) separates the cross
    from the convex shapes; area / (π R²), R the farthest pixel from the centroid, is 1 for a
    disc, 2/π for a square, 0.41 for an equilateral triangle."""
    _, labels, masks = shapes
    fill = {name: [] for name in synthetic.CLASSES}
    solidity = {name: [] for name in synthetic.CLASSES}
    for label, mask in zip(labels.tolist(), masks.numpy()):
        (region,) = regionprops(mask.astype(np.uint8))
        ys, xs = np.nonzero(mask)
        radius = np.hypot(ys - region.centroid[0], xs - region.centroid[1]).max() + 0.5
        name = synthetic.CLASSES[label]
        fill[name].append(region.area / (math.pi * radius**2))
        solidity[name].append(region.solidity)
    assert min(fill["circle"]) > 0.85
    assert min(fill["square"]) > 0.5 and max(fill["square"]) < 0.72
    assert min(fill["triangle"]) > 0.3 and max(fill["triangle"]) < 0.5
    for name in ("circle", "square", "triangle"):
        assert min(solidity[name]) > 0.85, name
    assert max(solidity["cross"]) < 0.8


def test_seeded_deterministic_and_prefix_stable() -> None:
    a = synthetic.make_dataset(70, seed=5)
    b = synthetic.make_dataset(70, seed=5)
    prefix = synthetic.make_dataset(10, seed=5)
    other = synthetic.make_dataset(10, seed=6)
    for x, y, z in zip(a, b, prefix):
        assert torch.equal(x, y) and torch.equal(x[:10], z)
    assert not torch.equal(a[0][:10], other[0])
    small = synthetic.make_dataset(3, size=32, seed=5)
    assert small[0].shape == (3, 3, 32, 32) and small[2].any((1, 2)).all()


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"n": 0}, PullbackWidgetsError), ({"n": 2.5}, PullbackWidgetsTypeError),
    ({"n": 2, "size": 16}, PullbackWidgetsError), ({"n": 2, "seed": -1}, PullbackWidgetsError),
    ({"n": True}, PullbackWidgetsTypeError),
])
def test_dataset_rejects_bad_arguments(kwargs, error) -> None:
    n = kwargs.pop("n")
    with pytest.raises(error):
        synthetic.make_dataset(n, **kwargs)


# --------------------------------------------------------------------------- the model


def test_network_is_in_the_papers_family() -> None:
    net = synthetic.ShapesNet()
    kinds = {type(m) for m in net.modules()}
    assert {nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, synthetic.ResidualBlock} <= kinds
    relus = [m for m in net.modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == len(relus) and not any(m.inplace for m in relus)
    assert sum(p.numel() for p in net.parameters()) < 200_000


def test_shipped_weights_and_provenance(model) -> None:
    assert synthetic.WEIGHTS_PATH.stat().st_size < 3_000_000
    state = torch.load(synthetic.WEIGHTS_PATH, weights_only=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    provenance = json.loads(synthetic.PROVENANCE_PATH.read_text())
    assert provenance["test_accuracy"] >= 0.97
    assert provenance["train_seconds"] > 0 and provenance["steps"] >= 1
    # The stated accuracy is reproducible here, on the stated fresh samples.
    images, labels, _ = synthetic.make_dataset(provenance["test_size"],
                                               seed=provenance["test_seed"])
    measured = synthetic.accuracy(model, images, labels, normalise=False)
    assert measured >= 0.97 and abs(measured - provenance["test_accuracy"]) <= 0.002


def test_load_model_shapes(model) -> None:
    assert model.labels == list(synthetic.CLASSES)
    assert model.input_size == 64 and not model.training
    images, labels, _ = synthetic.make_dataset(300, seed=11)  # fresh: neither test nor train
    assert synthetic.accuracy(model, images, labels, normalise=False) >= 0.95
    # The default T is the one the benchmark's temperature curve recommends.
    recommended = float(re.search(r"default T = ([0-9.]+)", RESULTS.read_text()).group(1))
    assert model.default_temperature == recommended


# The reduced budget: 100 steps of 32 reached 0.555 on the 400 test images when this was
# written (80 steps: 0.405, 150: 0.59; chance is 0.25), in 60 s on 1 thread of a loaded
# machine (load average 9 on 2 cores). The time is not checked here: a stopwatch in a test
# fails on a slower shared runner for no fault of the code (the benchmarks measure speed).
REDUCED_STEPS, REDUCED_BATCH, REDUCED_ACCURACY = 100, 32, 0.45


def test_training_reaches_the_stated_accuracy_on_a_reduced_budget() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        net, provenance = synthetic.train(steps=REDUCED_STEPS, batch_size=REDUCED_BATCH,
                                          test_size=400)
    finally:
        torch.set_num_threads(threads)
    assert provenance["test_accuracy"] >= REDUCED_ACCURACY, provenance
    assert not net.training


def test_train_command_writes_weights_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    out = tmp_path / "net.pt"
    assert synthetic._main(["train", "--steps", "2", "--batch-size", "4", "--threads", "1",
                            "--out", str(out)]) == 0
    assert set(json.loads(out.with_suffix(".json").read_text())) >= {
        "seed", "steps", "test_accuracy", "train_seconds"}
    before = out.read_bytes()
    assert synthetic.load_weights(out).head.out_features == 4
    assert synthetic._main(["train", "--steps", "1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before


# --------------------------------------------------------------------------- the metrics


def _random_case(seed: int = 0, batch: int = 4, size: int = 12):
    g = torch.Generator().manual_seed(seed)
    attribution = torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)
    attribution[0, :, :3] = 0.0  # ties
    masks = torch.rand(batch, size, size, generator=g) < 0.3
    return attribution, masks


def test_mask_mass_against_a_loop() -> None:
    attribution, masks = _random_case()
    result = gt.mask_mass(attribution, masks)
    for b in range(len(masks)):
        inside = total = 0.0
        for y in range(masks.shape[1]):
            for x in range(masks.shape[2]):
                value = abs(sum(float(attribution[b, c, y, x]) for c in range(3)))
                total += value
                inside += value if masks[b, y, x] else 0.0
        assert math.isclose(float(result[b]), inside / total, rel_tol=1e-12)
    assert float(gt.mask_mass(torch.zeros_like(attribution), masks).abs().max()) == 0


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e37), (torch.float64, 1e306)])
def test_mask_mass_of_maps_near_the_dtypes_largest_is_that_of_the_map_scaled_down(dtype, scale):
    # Channel sums near the largest number overflowed to inf (a float32 sum), and inf / inf
    # made the mass NaN; the mass is scale-free.
    attribution, masks = _random_case()
    attribution = attribution.abs().to(dtype)
    big = attribution / attribution.abs().max() * (scale * 30)  # finite in dtype
    assert torch.isfinite(big).all()
    torch.testing.assert_close(gt.mask_mass(big, masks), gt.mask_mass(attribution, masks),
                               rtol=1e-6, atol=0)


def test_mask_auc_against_pairwise_counts_and_sklearn() -> None:
    attribution, masks = _random_case(seed=1)
    attribution[1] = attribution[1].round(decimals=1)  # many ties
    result = gt.mask_auc(attribution, masks)
    for b in range(len(masks)):
        scores = attribution[b].sum(0).abs().flatten().tolist()
        labels = masks[b].flatten().tolist()
        positives = [s for s, m in zip(scores, labels) if m]
        negatives = [s for s, m in zip(scores, labels) if not m]
        wins = sum((p > q) + 0.5 * (p == q) for p in positives for q in negatives)
        assert math.isclose(float(result[b]), wins / (len(positives) * len(negatives)),
                            rel_tol=1e-12)
        assert math.isclose(float(result[b]), roc_auc_score(labels, scores), rel_tol=1e-12)
    assert torch.allclose(gt.mask_auc(torch.ones_like(attribution), masks),
                          torch.full((4,), 0.5, dtype=torch.float64))


def test_pointing_game_by_its_definition() -> None:
    masks = torch.zeros(4, 32, 32, dtype=torch.bool)
    masks[:, 8:16, 8:16] = True
    attribution = torch.zeros(4, 3, 32, 32)
    attribution[0, 1, 10, 10] = 1.0   # one spike on the object: hit
    attribution[1, 1, 25, 25] = 1.0   # one spike off it: miss
    # A lone strong pixel off the object against a broad patch on it: the blur (sigma 2 px)
    # lets the region win, which a raw argmax would not.
    attribution[2, 0, 9:15, 9:15] = 1.0
    attribution[2, 0, 28, 3] = 5.0
    # attribution[3] is all zero: it points nowhere, a miss.
    assert gt.pointing_game(attribution, masks).tolist() == [1.0, 0.0, 1.0, 0.0]
    assert int(attribution[2].sum(0).flatten().argmax()) == 28 * 32 + 3
    # Signs cancel across channels before the magnitude, as in the explorer's view.
    attribution[0, 0, 10, 10] = -1.0
    attribution[0, 2, 25, 25] = 0.5
    assert gt.pointing_game(attribution, masks)[0] == 0.0


@pytest.mark.parametrize("metric", [gt.mask_mass, gt.mask_auc, gt.pointing_game])
def test_metrics_reject_bad_input(metric) -> None:
    attribution, masks = _random_case()
    with pytest.raises(PullbackWidgetsError, match="bool"):
        metric(attribution, masks.float())
    with pytest.raises(PullbackWidgetsError, match="same B, H, W"):
        metric(attribution, masks[:, :5])
    empty = masks.clone()
    empty[2] = False
    with pytest.raises(PullbackWidgetsError, match="object and background"):
        metric(attribution, empty)
    attribution[0, 0, 0, 0] = math.nan
    with pytest.raises(PullbackWidgetsError, match="NaN"):
        metric(attribution, masks)


def test_intervals_against_their_formulas() -> None:
    values = torch.tensor([0.2, 0.5, 0.9, 0.4, 0.7], dtype=torch.float64)
    interval = gt.Interval.of(values)
    half = 2.776445 * np.std(values.numpy(), ddof=1) / math.sqrt(5)  # Student t, 4 d.f.
    assert math.isclose(interval.low, 0.54 - half, rel_tol=1e-6)
    assert math.isclose(interval.high, 0.54 + half, rel_tol=1e-6)
    hits = torch.tensor([1.0] * 18 + [0.0] * 2)
    wilson = gt.Interval.proportion(hits)
    # Wilson (1927) for 18 / 20, z = 1.96: [0.6990, 0.9721].
    assert round(wilson.low, 4) == 0.6990 and round(wilson.high, 4) == 0.9721
    assert gt.Interval.proportion(torch.ones(10)).high <= 1.0
    # On few values the normal approximation passes the range a mean can have: cut there.
    assert gt.Interval.of(torch.tensor([1.0, 1.0, 0.0])).high > 1
    assert gt.Interval.of(torch.tensor([1.0, 1.0, 0.0]), (0.0, 1.0)).high == 1.0
    assert gt.Interval.of(torch.tensor([-1.0, -1.0, 0.0]), (-1.0, 1.0)).low == -1.0


# --------------------------------------------------------------------------- the methods


def test_grad_cam_matches_captum(model) -> None:
    from captum.attr import LayerAttribution, LayerGradCam

    images, labels, _ = synthetic.make_dataset(3, seed=2)
    layer = "res2.conv2"
    ours = gt.grad_cam(layer)(model, images, labels)
    reference = LayerGradCam(model, dict(model.named_modules())[layer]).attribute(
        images, target=labels, relu_attributions=True)
    reference = LayerAttribution.interpolate(reference, (64, 64), interpolate_mode="bilinear")
    torch.testing.assert_close(ours.sum(1, keepdim=True), reference, rtol=1e-4, atol=1e-6)
    assert not any(m._forward_hooks for m in model.modules())


def test_the_benchmarked_pullback_is_the_explorers(model) -> None:
    images, labels, _ = synthetic.make_dataset(2, seed=4)
    methods = gt.ground_truth_methods(model, temperatures=(0.3,), gates=("normal_cdf",),
                                      captum=False)
    session = pw.PullbackSession(model, images)
    shown = session.pullback(labels, temperature=0.3, gate="normal_cdf")
    assert torch.equal(methods["pullback normal_cdf T=0.3"](model, images, labels), shown)


# --------------------------------------------------------------------------- the benchmark


def test_small_benchmark(model) -> None:
    """The CI version (n = 64): the random control sits at chance, and the methods that see
    the model beat it; the model is left as found."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    result = gt.ground_truth_benchmark(model, n=64, seed=1)
    assert result.accuracy >= 0.9 and result.n == 64
    assert {"gradient", "random", "gradcam", "integrated_gradients", "smoothgrad",
            "guided_backprop", "pullback sigmoid T=0.3", "pullback normal_cdf T=1"} \
        <= set(result.methods)
    chance = result.interval("random", "mask_auc")
    assert chance.low < 0.5 < chance.high
    beaten = result.beats("random")
    assert "gradient" in beaten and "pullback sigmoid T=0.3" in beaten
    assert "| gradient |" in result.table() and "random" in result.difference_table("gradient")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training and not any(m._forward_hooks for m in model.modules())


def test_benchmark_rejects_bad_arguments(model) -> None:
    with pytest.raises(PullbackWidgetsError, match="at least one"):
        gt.ground_truth_benchmark(model, {}, n=4)
    with pytest.raises(PullbackWidgetsError):
        gt.ground_truth_benchmark(model, n=1)
    with pytest.raises(PullbackWidgetsTypeError):
        gt.ground_truth_benchmark("shapes", n=4)  # type: ignore[arg-type]
    lite = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.LazyLinear(10))
    lite(torch.rand(1, 3, 64, 64))
    with pytest.raises(PullbackWidgetsError, match="10 outputs"):
        gt.ground_truth_benchmark(lite, {"random": random_attribution}, n=4)
    result = gt.ground_truth_benchmark(model, {"random": random_attribution}, n=4)
    with pytest.raises(PullbackWidgetsError, match="no method 'gradient'"):
        result.difference("random", "gradient", "mask_auc")


# --------------------------------------------------------------------------- the runner


def test_evaluate_synthetic_through_the_runner_equals_the_benchmark(tmp_path, model) -> None:
    from pullback_widgets import cli
    from pullback_widgets.evaluation import gradient, read_rows

    out = tmp_path / "shapes.csv"
    assert cli.main(["evaluate", "--synthetic", "6", "--seed", "2", "--methods", "gradient",
                     "random", "--batch-size", "4", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert len(rows) == 6 * 2 * 3
    reference = gt.ground_truth_benchmark(
        model, {"gradient": gradient, "random": random_attribution}, n=6, seed=2)
    labels = synthetic.make_dataset(6, seed=2)[1]
    for image, target, method, metric, value in rows:
        index = int(image.rsplit("-", 1)[1])
        assert target == int(labels[index])
        assert math.isclose(value, float(reference.scores[method][metric][index]),
                            rel_tol=1e-9, abs_tol=1e-12), (image, method, metric)
    assert "mask_auc" in out.with_name("shapes.summary.md").read_text()


def test_evaluate_synthetic_refuses_bad_combinations(tmp_path, capsys) -> None:
    from PIL import Image

    from pullback_widgets import cli
    from pullback_widgets.images import sample_image_array

    photo = tmp_path / "photo.png"
    Image.fromarray(sample_image_array("coffee")[:64, :64]).save(photo)
    assert cli.main(["evaluate", str(photo), "--synthetic", "4", "--out",
                     str(tmp_path / "a.csv")]) == 2
    assert "not both" in capsys.readouterr().err
    assert cli.main(["evaluate", "--synthetic", "4", "--labels-from-folders", "--out",
                     str(tmp_path / "a.csv")]) == 2
    assert "--synthetic images carry their own" in capsys.readouterr().err
    assert cli.main(["evaluate", "--synthetic", "3", "--image-size", "16", "--out",
                     str(tmp_path / "a.csv")]) == 2
    assert "--image-size must be >= 32, got 16" in capsys.readouterr().err
    assert cli.main(["evaluate", "--out", str(tmp_path / "b.csv")]) == 2
    assert "--synthetic N" in capsys.readouterr().err
    assert cli.main(["evaluate", str(photo), "--metrics", "mass", "--out",
                     str(tmp_path / "c.csv")]) == 2
    assert "evidence mask" in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()


# --------------------------------------------------------------------------- the explorer


def test_explorer_shows_the_evidence_mask(model) -> None:
    images, _, masks = synthetic.make_dataset(1, seed=9)
    explorer = pw.PullbackExplorer(model, image=images[0], evidence=masks[0])
    assert explorer.wait(120), "the explorer is still computing"
    assert "⚠" not in explorer.status.value, explorer.status.value
    # Four classes, five top-class buttons: the fifth is hidden.
    assert [b.layout.display for b in explorer.top_buttons][3:] == [None, "none"]
    assert explorer.show_evidence.layout.display is None
    # The image is the dataset's, untouched, so the mask lies on the object.
    assert torch.equal(explorer._session.inputs, images)
    assert not any(t.type == "contour" for t in explorer.pullback_figure.data)
    explorer.show_evidence.value = True
    assert explorer.wait(120)
    for figure in (explorer.pullback_figure, explorer.gradient_figure):
        (outline,) = [t for t in figure.data if t.type == "contour"]
        assert np.array_equal(np.asarray(outline.z) > 0.5, masks[0].numpy())
    assert "⚠" not in explorer.status.value, explorer.status.value
    explorer.close()
    plain = pw.PullbackExplorer(model, image=images[0])
    assert plain.show_evidence.layout.display == "none"
    plain.close()
    with pytest.raises(PullbackWidgetsError, match="bool mask"):
        pw.PullbackExplorer(model, image=images[0], evidence=masks[0].float())
    with pytest.raises(PullbackWidgetsError, match="input size"):
        pw.PullbackExplorer(model, image=images[0, :, :32, :32], evidence=masks[0])


def test_the_training_command_runs_as_documented_without_a_warning() -> None:
    # `python -m pullback_widgets.synthetic` ran the module the package had already imported:
    # runpy warned of "unpredictable behaviour" before every training.
    done = subprocess.run([sys.executable, "-W", "default", "-m", "pullback_widgets.synthetic",
                           "train", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--steps" in done.stdout and "Warning" not in done.stderr, done.stderr
