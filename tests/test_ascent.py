"""Pullback ascent: one step by hand, projection, batching, callbacks, the grid, bad input."""

import pytest
import torch

import pullback_widgets as pw
from tests.reference import EveryOpNet, reference_pullback


def _net() -> EveryOpNet:
    torch.manual_seed(0)
    return EveryOpNet().double().eval()


def _image(batch: int = 2, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.rand(batch, 3, 12, 12, dtype=torch.float64) * 0.8 + 0.1


def _hand_step(direction, start, current, step_size, eps):
    """One step, written out per example: normalise, move, project, clamp."""
    out = []
    for d, s, c in zip(direction, start, current):
        moved = c + step_size * d / d.norm()
        delta = moved - s
        if delta.norm() > eps:
            delta = delta * (eps / delta.norm())
        out.append((s + delta).clamp(0, 1))
    return torch.stack(out)


@pytest.mark.parametrize("eps", [0.5, 100.0])  # projection active / inactive
def test_one_step_matches_hand_computation(eps):
    net, x = _net(), _image()
    result = pw.pullback_ascent(net, x, 2, steps=1, step_size=1.0, eps=eps, temperature=0.5,
                                progress=False)
    direction = reference_pullback(net, x, 2, 0.5, "sigmoid")
    expected = _hand_step(direction, x, x, 1.0, eps)
    torch.testing.assert_close(result.images[1], expected)
    assert len(result.images) == 2 and torch.equal(result.images[0], x)
    torch.testing.assert_close(result.diff, expected - x)


def test_gradient_method_uses_plain_gradients():
    net, x = _net(), _image()
    result = pw.pullback_ascent(net, x, 1, steps=1, step_size=0.7, eps=5.0,
                                method="gradient", progress=False)
    xg = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(net(xg)[:, 1].sum(), xg)
    torch.testing.assert_close(result.images[1], _hand_step(grad, x, x, 0.7, 5.0))


def test_trajectory_stays_in_the_ball_and_in_range():
    net, x = _net(), _image()
    result = pw.pullback_ascent(net, x, 3, steps=6, step_size=2.0, eps=3.0, progress=False)
    assert len(result.images) == 7
    for image in result.images:
        assert (image - x).flatten(1).norm(dim=1).max() <= 3.0 + 1e-9
        assert image.min() >= 0 and image.max() <= 1
    assert result.logits.shape == (7, 2) and result.probs.shape == (7, 2)
    with torch.no_grad():
        logits = net(result.images[-1])[:, 3]
    torch.testing.assert_close(result.logits[-1], logits)


def test_target_logit_rises():
    net, x = _net(), _image()
    result = pw.pullback_ascent(net, x, 4, steps=4, step_size=0.5, eps=10.0, progress=False)
    assert (result.gain > 0).all()


def test_batch_equals_one_by_one():
    net, x = _net(), _image(3)
    together = pw.pullback_ascent(net, x, [0, 2, 4], steps=2, step_size=1.0, eps=1.5,
                                  progress=False)
    for i, target in enumerate([0, 2, 4]):
        alone = pw.pullback_ascent(net, x[i:i + 1], target, steps=2, step_size=1.0, eps=1.5,
                                   progress=False)
        torch.testing.assert_close(together.images[-1][i:i + 1], alone.images[-1])
        torch.testing.assert_close(together.logits[:, i:i + 1], alone.logits)


def test_unit_target_raises_the_unit():
    net, x = _net(), _image(1)
    unit = pw.Unit("conv4", 2)
    result = pw.pullback_ascent(net, x, unit, steps=3, step_size=0.5, eps=5.0, progress=False)
    assert result.probs is None
    with torch.no_grad():
        start = net.conv4
        activations = {}
        handle = start.register_forward_hook(lambda m, a, o: activations.update(out=o))
        net(result.images[-1])
        handle.remove()
    torch.testing.assert_close(result.logits[-1], activations["out"][:, 2].mean((1, 2)))
    assert result.gain[0] > 0


def test_callback_sees_every_step_and_can_stop():
    net, x = _net(), _image(1)
    seen = []

    def callback(step, result):
        seen.append((step, len(result.images), result.logits.shape[0]))
        return step == 2

    result = pw.pullback_ascent(net, x, 0, steps=5, step_size=0.5, callback=callback,
                                progress=False)
    assert seen == [(1, 2, 2), (2, 3, 3)]
    assert result.stopped and len(result.images) == 3


def test_the_result_keeps_its_own_start_when_the_caller_reuses_the_input():
    net, x = _net(), _image(1)
    result = pw.pullback_ascent(net, x, 0, steps=2, progress=False)
    start, diff = result.images[0].clone(), result.diff.clone()
    x.fill_(0.5)  # the caller's buffer, reused
    assert torch.equal(result.images[0], start) and torch.equal(result.diff, diff)


def test_zero_steps_returns_the_start():
    net, x = _net(), _image(1)
    result = pw.pullback_ascent(net, x, 0, steps=0, progress=False)
    assert len(result.images) == 1 and result.logits.shape == (1, 1)
    assert float(result.diff.abs().max()) == 0.0


def test_grid_rows_are_images_and_columns_targets():
    net, x = _net(), _image(2)
    grid = pw.ascent_grid(net, x, [1, 3, 4], steps=2, step_size=0.5, eps=2.0, progress=False)
    assert grid.images.shape == (2, 3, 3, 12, 12) and grid.gains.shape == (2, 3)
    single = pw.pullback_ascent(net, x, 3, steps=2, step_size=0.5, eps=2.0, progress=False)
    torch.testing.assert_close(grid.images[:, 1], single.images[-1])
    torch.testing.assert_close(grid.diffs[:, 1], single.diff)


def test_grid_default_targets_put_own_class_on_the_diagonal():
    net, x = _net(), _image(2, seed=7)
    grid = pw.ascent_grid(net, x, steps=1, step_size=0.5, progress=False)
    with torch.no_grad():
        assert grid.targets == net(x).argmax(1).tolist()


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"steps": -1}, ValueError, "steps"),
    ({"steps": 2.5}, TypeError, "steps"),
    ({"step_size": 0.0}, ValueError, "step_size"),
    ({"eps": -1.0}, ValueError, "eps"),
    ({"eps": float("inf")}, ValueError, "eps"),
    ({"method": "lbfgs"}, ValueError, "method"),
    ({"temperature": 0.0}, ValueError, "temperature"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        pw.pullback_ascent(_net(), _image(1), 0, progress=False, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_steps_too_small_for_the_dtype_leave_the_image_where_it_is(dtype):
    # 1e-300 is 0 in float32: the step's unit is kept at the dtype's smallest normal number,
    # so nothing divides by 0 (that gave a NaN image, then an error blaming the input).
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 10 * 10, 3)).to(dtype).eval()
    x = _image(1).to(dtype)
    result = pw.pullback_ascent(net, x, 1, steps=2, step_size=1e-300, eps=1e-300,
                                progress=False)
    assert all(torch.equal(image, x) for image in result.images)


def test_image_outside_pixel_range_is_rejected():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        pw.pullback_ascent(_net(), _image(1) * 3, 0, progress=False)
    with pytest.raises(TypeError, match="targets"):
        pw.ascent_grid(_net(), _image(1), ["cat"], progress=False)
