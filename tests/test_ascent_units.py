"""The AscentExplorer on hidden units, from grey and noise, pullback beside gradient ascent;
and the engine helpers it uses (ascent_start, stack_results)."""

import pytest
import torch

import pullback_widgets as pw
from pullback_widgets.ascent import START_DEFAULTS, ascent_start, stack_results
from pullback_widgets.widgets.ascent import COUNTERFACTUAL_HELP
from pullback_widgets.widgets.common import LOGITS
from tests.conftest import LABELS


@pytest.fixture
def explorer(net):
    made = pw.AscentExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    yield made
    made.close()


def _ascent(net, start, target, **settings):
    return pw.pullback_ascent(net, start, target, temperature=0.5, progress=False, **settings)


def test_ascent_start_grey_noise_and_photo():
    grey = ascent_start("grey", 8)
    assert grey.shape == (1, 3, 8, 8) and bool((grey == 0.5).all())
    state = torch.random.get_rng_state()
    noise = ascent_start("noise", 8, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    assert torch.equal(noise, torch.rand((1, 3, 8, 8), generator=torch.Generator().manual_seed(7)))
    assert torch.equal(noise, ascent_start("noise", 8, seed=7))
    assert not torch.equal(noise, ascent_start("noise", 8, seed=8))
    assert float(noise.min()) >= 0 and float(noise.max()) < 1
    photo = torch.rand(1, 3, 8, 8)
    assert ascent_start("photo", 8, photo=photo) is photo
    with pytest.raises(pw.PullbackWidgetsError, match="needs the photo"):
        ascent_start("photo", 8)
    with pytest.raises(pw.PullbackWidgetsError, match="start"):
        ascent_start("gray", 8)
    with pytest.raises(ValueError):
        ascent_start("noise", 8, seed=-1)


def test_stack_results_cuts_to_the_shortest(net):
    start = ascent_start("grey", 32)
    long = _ascent(net, start, 1, steps=3, step_size=2.0, eps=4.0)
    short = _ascent(net, start, 2, steps=1, step_size=2.0, eps=4.0)
    both = stack_results([long, short])
    assert len(both.images) == 2 and both.images[1].shape[0] == 2
    torch.testing.assert_close(both.images[1][1], short.images[1][0])
    torch.testing.assert_close(both.logits[:, 0], long.logits[:2, 0])
    assert both.probs.shape == (2, 2)
    with pytest.raises(pw.PullbackWidgetsError):
        stack_results([])


def test_hidden_unit_from_grey_matches_the_engine_and_is_labelled_as_an_activation(
        net, explorer):
    assert explorer.layer.options[0][1] == LOGITS and "conv4" in explorer.layer_control.shapes
    explorer.layer.value = "conv4"
    assert not explorer.channel.disabled and explorer.target.disabled
    explorer.channel.value = 5
    explorer.start.value = "grey"
    assert (explorer.steps.value, explorer.step_size.value, explorer.eps.value) == \
        START_DEFAULTS["grey"]
    explorer.steps.value, explorer.step_size.value, explorer.eps.value = 3, 2.0, 8.0
    assert explorer.run() and explorer.wait()
    expected = _ascent(net, ascent_start("grey", 32), pw.Unit("conv4", 5), steps=3,
                       step_size=2.0, eps=8.0)
    torch.testing.assert_close(explorer.result.images[-1], expected.images[-1])
    torch.testing.assert_close(explorer.result.logits, expected.logits)
    assert explorer.result.images[0].eq(0.5).all()
    assert explorer.curve_figure.layout.yaxis.title.text == "unit activation (spatial mean)"
    assert len(explorer.frames_figure.layout.annotations) == 1
    assert "conv4 channel 5" in explorer.frames_figure.layout.annotations[0].text
    assert "activation" in explorer.frames_figure.layout.annotations[0].text
    assert "activation gain" in explorer.status.value and "from grey" in explorer.status.value
    # The finished run names its own settings, whatever the controls say since.
    explorer.step_size.value = 5.0
    assert "step size 2, eps 8" in explorer.status.value
    assert f"T = {explorer.temperature.value:.3g}" in explorer.status.value


def test_noise_start_reproduces_with_its_seed_and_both_methods_run_side_by_side(
        net, explorer):
    explorer.layer.value = "conv5"
    explorer.channel.value = 2
    explorer.start.value = "noise"
    assert explorer.seed.layout.display is None
    explorer.seed.value = 11
    explorer.method.value = "both"
    explorer.steps.value, explorer.step_size.value, explorer.eps.value = 2, 3.0, 10.0
    assert explorer.run() and explorer.wait()
    start = ascent_start("noise", 32, seed=11)
    unit = pw.Unit("conv5", 2)
    pullback = _ascent(net, start, unit, steps=2, step_size=3.0, eps=10.0)
    gradient = _ascent(net, start, unit, steps=2, step_size=3.0, eps=10.0, method="gradient")
    final = explorer.result.images[-1]
    assert final.shape[0] == 2
    torch.testing.assert_close(final[:1], pullback.images[-1])
    torch.testing.assert_close(final[1:], gradient.images[-1])
    torch.testing.assert_close(explorer.result.images[0][1:], start)
    assert [t.name for t in explorer.curve_figure.data] == [
        pw.figures.plain_text(name)
        for name in ("pullback: conv5 channel 2", "gradient: conv5 channel 2")]
    assert not torch.equal(final[0], final[1])


def test_counterfactual_stays_class_only_and_says_so(net, explorer):
    assert explorer.counterfactual_help.value == ""
    explorer.layer.value = "conv4"
    assert COUNTERFACTUAL_HELP in explorer.counterfactual_help.value
    explorer.counterfactual.value = True
    assert explorer.layer.disabled and explorer.channel.disabled
    explorer.targets.value = ["ant (0)", "dog (3)"]
    explorer.steps.value = 1
    assert explorer.run() and explorer.wait()
    assert explorer.curve_figure.layout.yaxis.title.text == "target logit"
    expected = _ascent(net, explorer._images["coffee"].expand(2, -1, -1, -1), [0, 3], steps=1)
    torch.testing.assert_close(explorer.result.images[-1], expected.images[-1])
    explorer.counterfactual.value = False
    assert not explorer.layer.disabled and not explorer.channel.disabled


def test_an_eps_beyond_the_dtypes_range_is_a_ball_larger_than_the_cube(net):
    # eps = 1e308 overflowed to inf in float32 and 0 * inf made every pixel NaN; any radius
    # beyond the cube's diagonal gives the same trajectory.
    start = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    wide = _ascent(net, start, 1, steps=2, eps=1e6)
    for eps in (3.5e38, 1e308):
        result = _ascent(net, start, 1, steps=2, eps=eps)
        torch.testing.assert_close(torch.stack(result.images), torch.stack(wide.images))


def test_a_run_that_fails_before_its_first_step_leaves_no_frames_under_its_labels(explorer):
    explorer.steps.value = 1
    assert explorer.run() and explorer.wait()
    assert explorer.result is not None and not explorer.frame.disabled
    def failing_forward(x):  # the user's model raises in the next run
        raise RuntimeError("the model failed")

    explorer.model.forward = failing_forward
    explorer.channel.value = 1
    explorer.layer.value = explorer.layer.options[1][1]  # a hidden unit now
    assert explorer.run() and explorer.wait()
    assert "the model failed" in explorer.status.value
    assert explorer.result is None and explorer.frame.disabled
