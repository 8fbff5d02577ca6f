"""A hostile user against pullback ascent and the evaluation's metrics (third review): each
test failed before its fix, but for the textbook comparisons, which guard what was right."""

import numpy as np
import pytest
import torch
from torch import nn

import pullback_widgets as pw
from pullback_widgets.ascent import stack_results
from pullback_widgets.evaluation import metrics, runner
from pullback_widgets.models import Normalize


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).eval()


def _images(batch: int = 2, size: int = 8, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


# ---------------------------------------------------------------- ascent

def test_stack_results_refuses_results_without_their_frames():
    # A keep_frames=False result holds [start, end] but every step's logits: stacked, its end
    # image stood as frame 1 beside the logits of step 1 (cut to two frames), and a stack of it
    # with a full result put one's step 1 beside the other's last step, without a word.
    net, x = _net(), _images()
    lean = pw.pullback_ascent(net, x, 1, steps=3, step_size=2.0, eps=4.0, progress=False,
                              keep_frames=False)
    full = pw.pullback_ascent(net, x, 2, steps=3, step_size=2.0, eps=4.0, progress=False)
    for results in ([lean], [full, lean]):
        with pytest.raises(pw.PullbackWidgetsError, match="keep_frames"):
            stack_results(results)
    # One step, or none: start and end are every frame, and those stack as before.
    short = pw.pullback_ascent(net, x, 1, steps=1, step_size=2.0, eps=4.0, progress=False,
                               keep_frames=False)
    both = stack_results([short, full])
    assert len(both.images) == 2 and both.logits.shape == (2, 4)
    assert torch.equal(both.images[1][:2], short.images[1])


# ---------------------------------------------------------------- deletion / insertion

def test_a_baseline_that_is_no_tensor_nor_a_name_is_a_clear_error():
    # A numpy baseline (np.zeros((3, 1, 1)) for black) failed with numpy's "The truth value of
    # an array with more than one element is ambiguous", from baseline == "blur"; a meta tensor
    # was said not to broadcast to the images.
    net, x = _net(), _images()
    attribution = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    with pytest.raises(pw.PullbackWidgetsTypeError, match="baseline must be"):
        metrics.deletion_auc(net, x, None, attribution, baseline=np.zeros((3, 1, 1)), steps=2)
    with pytest.raises(pw.PullbackWidgetsError, match="meta"):
        metrics.insertion_auc(net, x, None, attribution,
                              baseline=torch.zeros(3, 1, 1, device="meta"), steps=2)
    # The tensor of the same values is the black baseline.
    black = metrics.deletion_auc(net, x, None, attribution, baseline=torch.zeros(3, 1, 1),
                                 steps=2)
    assert black.shape == (2,) and torch.isfinite(black).all()


# ---------------------------------------------------------------- the runner

@pytest.mark.parametrize("name", ["ResNet50", " shapes", "resnet-50"])
def test_run_command_with_a_model_name_the_registry_lacks_names_the_model(tmp_path, name):
    # The model's image size was looked up only for known names: any other left image_size
    # None, and the error said "image_size must be an int, got NoneType" (with a size given,
    # it came only once the run had begun).
    out = tmp_path / "run.csv"
    with pytest.raises(pw.PullbackWidgetsError, match="model name must be one of") as error:
        runner.run_command([], out=out, synthetic_images=2, model=name, targets="predicted")
    assert "image_size" not in str(error.value)
    with pytest.raises(pw.PullbackWidgetsError, match="model name must be one of"):
        runner.run_command([], out=out, synthetic_images=2, model=name, targets="predicted",
                           image_size=64)
    assert list(tmp_path.iterdir()) == []


def test_settings_with_a_bare_metric_name_or_targets_of_no_text_say_so():
    # metrics="deletion" was split into letters before its check: "metric must be one of
    # (...), got 'd'"; targets=None or 5 (a class) failed inside re with "expected string or
    # bytes-like object".
    with pytest.raises(pw.PullbackWidgetsTypeError, match="metrics must be a non-empty list"):
        runner.EvaluationSettings(metrics="deletion")
    for targets in (None, 5):
        with pytest.raises(pw.PullbackWidgetsTypeError, match="targets must be 'predicted'"):
            runner.EvaluationSettings(targets=targets)
    assert runner.EvaluationSettings(metrics=["deletion"], targets="top-3").top_k() == 3


# ---------------------------------------------------------------- the model registry

@pytest.mark.parametrize("mean, std", [
    ((0.5, 0.5, 0.5), (float("nan"), 1.0, 1.0)),   # every output NaN
    ((0.5, 0.5, 0.5), (float("inf"), 1.0, 1.0)),   # a channel of zeros
    ((float("nan"), 0.0, 0.0), (1.0, 1.0, 1.0)),
    ((0.0, 0.0, 0.0), (1e-50, 1.0, 1.0)),          # 0 in float32: a channel of infinities
])
def test_normalize_refuses_values_that_make_no_finite_image(mean, std):
    # Only std <= 0 was refused: NaN passed that test, and these built a Normalize whose
    # output was NaN, 0 or inf everywhere in a channel, without a word.
    with pytest.raises(pw.PullbackWidgetsError, match=r"finite|> 0 \(in float32\)"):
        Normalize(mean, std)


def test_normalize_of_numpy_or_text_values():
    # numpy arrays gave float64 buffers, so a float32 image came out float64 and a float32
    # model refused it; text failed with Python's "'<=' not supported between 'str' and 'int'".
    norm = Normalize(np.full(3, 0.5), np.full(3, 0.25))
    assert norm.mean.dtype == norm.std.dtype == torch.float32
    x = _images(1)
    assert torch.equal(norm(x), (x - 0.5) / 0.25)
    assert torch.equal(Normalize(torch.full((3,), 0.5), [0.25] * 3)(x), norm(x))
    with pytest.raises(pw.PullbackWidgetsTypeError, match="numbers"):
        Normalize((0.0, 0.0, 0.0), ("1", 1.0, 1.0))
