"""A hostile user against pullback ascent, its grid, the ascent explorer and the HTML reports:
each test but the textbook one failed before its fix."""

import pytest
import torch

import pullback_widgets as pw
from pullback_widgets import ascent as ascent_module
from pullback_widgets.ascent import ascent_start
from pullback_widgets.report import explain, explain_html, grid_html
from tests.conftest import LABELS, every_op_net
from tests.reference import reference_pullback


def _image(batch: int = 1, size: int = 32, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator)


# ---------------------------------------------------------------- pullback_ascent, the math

def test_three_steps_match_a_textbook_loop_with_the_ball_and_the_box_active():
    # Step 1 was checked by hand, but only from the start, where current - start is 0: here
    # the later steps move from inside the ball, get projected back, and clamp at 0 and 1.
    net = every_op_net()
    x = _image(2, size=12).double()
    x[:, 0] = 1.0  # a channel on the box's edge: the clamp has work to do
    step_size, eps, temperature = 1.5, 2.0, 0.5
    result = pw.pullback_ascent(net, x, 3, steps=3, step_size=step_size, eps=eps,
                                temperature=temperature, progress=False)
    current, projected = x.clone(), 0
    for step in range(1, 4):
        direction = reference_pullback(net, current, 3, temperature, "sigmoid")
        moved = []
        for d, s, c in zip(direction, x, current):
            delta = c + step_size * d / d.norm() - s
            if delta.norm() > eps:
                delta, projected = delta * (eps / delta.norm()), projected + 1
            moved.append((s + delta).clamp(0, 1))
        current = torch.stack(moved)
        torch.testing.assert_close(result.images[step], current)
    assert projected >= 2  # the ball was active, not only the step
    with torch.no_grad():
        torch.testing.assert_close(result.logits[-1], net(current)[:, 3])


# ---------------------------------------------------------------- pullback_ascent, bad input

def test_a_callback_that_cannot_be_called_is_refused_before_any_forward(net):
    forwards = []
    handle = net.register_forward_hook(lambda *_: forwards.append(1))
    try:
        # It failed with "'int' object is not callable" (not the package's error) after the
        # first step's forward and pullback.
        with pytest.raises(pw.PullbackWidgetsTypeError, match="callback"):
            pw.pullback_ascent(net, _image(), 1, steps=2, callback=1, progress=False)
    finally:
        handle.remove()
    assert forwards == []


def test_a_noise_seed_beyond_64_bits_is_a_clear_error():
    # torch's own ValueError said only "Overflow when unpacking long long".
    with pytest.raises(pw.PullbackWidgetsError, match="seed must be below 2\\*\\*64"):
        ascent_start("noise", 8, seed=2**64)
    assert ascent_start("noise", 8, seed=2**64 - 1).shape == (1, 3, 8, 8)


def test_keep_frames_false_keeps_the_end_and_every_score(net):
    x = _image()
    full = pw.pullback_ascent(net, x, 2, steps=4, step_size=2.0, eps=4.0, progress=False)
    lean = pw.pullback_ascent(net, x, 2, steps=4, step_size=2.0, eps=4.0, progress=False,
                              keep_frames=False)
    assert len(lean.images) == 2 and torch.equal(lean.images[0], x)
    assert torch.equal(lean.images[-1], full.images[-1])
    assert torch.equal(lean.logits, full.logits) and torch.equal(lean.gain, full.gain)


# ---------------------------------------------------------------- ascent_grid

def test_the_grid_holds_no_trajectories(net, monkeypatch):
    # Every column kept all its frames to the end: N images x T targets x (steps + 1) frames,
    # gigabytes for the command line's grid at 100 steps.
    kept = []

    def spied(*args, **kwargs):
        result = ascent(*args, **kwargs)
        kept.append(result)
        return result

    ascent = ascent_module.pullback_ascent
    monkeypatch.setattr(ascent_module, "pullback_ascent", spied)
    grid = pw.ascent_grid(net, _image(2), [1, 3], steps=4, step_size=2.0, eps=4.0,
                          progress=False)
    assert [len(result.images) for result in kept] == [2, 2]
    monkeypatch.undo()
    alone = pw.pullback_ascent(net, _image(2), 3, steps=4, step_size=2.0, eps=4.0,
                               progress=False)
    assert torch.equal(grid.images[:, 1], alone.images[-1])
    assert torch.equal(grid.gains[:, 1], alone.gain)


def test_the_grid_says_which_columns_a_callback_stopped(net):
    # A callback's stop ended one column after 1 step while the others ran 3, and the grid
    # said nothing: its gains read as if all were of 3 steps.
    calls = []

    def stop_in_the_second_column(step, result):
        calls.append(step)
        return len(calls) == 4  # steps 1, 2, 3 of the first column, then step 1

    grid = pw.ascent_grid(net, _image(2), [1, 3, 4], steps=3, step_size=2.0, eps=4.0,
                          progress=False, callback=stop_in_the_second_column)
    assert grid.stopped == [False, True, False]
    one_step = pw.pullback_ascent(net, _image(2), 3, steps=1, step_size=2.0, eps=4.0,
                                  progress=False)
    torch.testing.assert_close(grid.gains[:, 1], one_step.gain)



@pytest.mark.parametrize("as_array", [torch.tensor, lambda t: torch.tensor(t).numpy()])
def test_the_grid_takes_a_1d_array_of_classes_as_the_list(net, as_array):
    # logits.argmax(1) was refused ("a non-empty sequence"), though the docstring says any
    # integer type counts.
    kwargs = dict(steps=1, step_size=2.0, eps=4.0, progress=False)
    grid = pw.ascent_grid(net, _image(2), as_array([1, 3]), **kwargs)
    assert grid.targets == [1, 3]
    assert torch.equal(grid.images, pw.ascent_grid(net, _image(2), [1, 3], **kwargs).images)
    with pytest.raises(TypeError, match="sequence"):
        pw.ascent_grid(net, _image(2), torch.tensor([[1, 3]]), **kwargs)

# ---------------------------------------------------------------- the explain report

def test_what_on_progress_returns_does_not_cut_the_ascents_short(net):
    # on_progress's value went back to the ascent as the callback's: one that returns True
    # (tqdm's update() does, whenever it redraws) stopped both ascents after their first step,
    # and the report showed 1 step of the 4 asked for.
    seen = []

    def progress(what):
        seen.append(what)
        return True

    explanation = explain(net, _image(), 1, steps=4, on_progress=progress)
    assert len(explanation.ascent.images) == len(explanation.gradient_ascent.images) == 5
    assert not explanation.ascent.stopped and not explanation.gradient_ascent.stopped
    assert len(seen) == 3 + 2 * 4


@pytest.mark.parametrize(("target", "error", "match"), [
    (pw.Unit("conv4", 0), pw.PullbackWidgetsTypeError, "target must be an int"),
    ([1], pw.PullbackWidgetsTypeError, "target must be an int"),
    (True, pw.PullbackWidgetsTypeError, "bool"),
    (5, pw.PullbackWidgetsError, r"class 5 is out of range \[0, 5\)"),
])
def test_explain_takes_one_class_index_and_checks_it_before_any_work(net, target, error, match):
    # A Unit or a list passed the maps and both ascents, and the page then failed with
    # "list indices must be integers" (not the package's error); 5 failed after the forward.
    seen = []
    with pytest.raises(error, match=match):
        explain(net, _image(), target, steps=1, on_progress=seen.append)
    assert seen == []


@pytest.mark.parametrize(("image", "settings", "match"), [
    (_image() * 3, {}, r"pixel space \[0, 1\]"),
    (_image(), {"steps": -1}, "steps must be >= 0"),
    (_image(), {"steps": 2.0}, "steps must be an int"),
    (_image(), {"step_size": float("nan")}, "step_size must be a finite number"),
    (_image(), {"eps": 0}, "eps must be a finite number"),
])
def test_explain_refuses_a_bad_image_or_ascent_setting_before_any_work(net, image, settings,
                                                                       match):
    # The maps and the temperature strip were computed, then the ascent refused them.
    seen = []
    with pytest.raises(pw.PullbackWidgetsError, match=match):
        explain(net, image, 1, **{"steps": 1, **settings}, on_progress=seen.append)
    assert seen == []


def test_the_explanation_keeps_its_own_image_off_the_callers_graph(net):
    x = _image().requires_grad_()
    explanation = explain(net, x, 1, steps=1)
    # It held x[0] itself, a view on the caller's graph: a reused buffer changed the report.
    assert not explanation.image.requires_grad
    kept = explanation.image.clone()
    with torch.no_grad():
        x.fill_(0.5)
    assert torch.equal(explanation.image, kept)
    assert explain_html(explanation, LABELS).startswith("<!DOCTYPE html>")


# ---------------------------------------------------------------- the grid report

@pytest.fixture(scope="module")
def two_by_two() -> pw.AscentGrid:
    model = every_op_net(dtype=torch.float32)
    return pw.ascent_grid(model, _image(2), [1, 2], steps=1, progress=False)


@pytest.mark.parametrize("row_labels", [["a.jpg"], ["a.jpg", "b.jpg", "c.jpg"], "ab"])
def test_grid_html_needs_one_row_label_per_image(two_by_two, row_labels):
    # One name for two images drew one row and dropped the other without a word; three
    # raised IndexError.
    with pytest.raises(pw.PullbackWidgetsError, match="row_labels must name each of the "
                                                      "grid's 2 images"):
        grid_html(two_by_two, row_labels, LABELS, {})


def test_grid_html_needs_a_name_for_every_target_class(two_by_two):
    with pytest.raises(pw.PullbackWidgetsError, match="labels must name every class up to "
                                                      "the grid's target 2"):
        grid_html(two_by_two, ["a.jpg", "b.jpg"], LABELS[:2], {})
    assert "b.jpg" in grid_html(two_by_two, ["a.jpg", "b.jpg"], LABELS[:3], {})


# ---------------------------------------------------------------- AscentExplorer

def test_a_finished_run_of_zero_steps_fills_the_progress_bar(net):
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    try:
        explorer.steps.value = 0
        assert explorer.run() and explorer.wait()
        # The bar's max is 1 for 0 steps, and it stayed at 0 of 1 after the run had ended.
        assert "0 steps" in explorer.status.value
        assert explorer.progress.value == explorer.progress.max == 1
    finally:
        explorer.close()


def test_both_methods_count_their_steps_on_one_bar_that_only_rises(net):
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    seen = []
    explorer.progress.observe(lambda change: seen.append(change["new"]), "value")
    try:
        explorer.steps.value, explorer.method.value = 2, "both"
        assert explorer.run() and explorer.wait()
        # The gradient's steps restarted the bar at 1 of 2 after the pullback's 2 of 2.
        assert explorer.progress.max == 4
        assert seen == sorted(seen) and seen[-1] == 4
    finally:
        explorer.close()
