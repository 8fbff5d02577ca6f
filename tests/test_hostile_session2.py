"""A session's cached forward and the synthetic shapes, tried as a hostile user would: a
pullback called from inside the session's own backward, bytes read as a list of classes, and
a dataset that painted a whole block of images to return one, or began painting a number of
images no memory holds. Each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

import pullback_widgets as pw
from pullback_widgets import synthetic
from tests.conftest import every_op_net, random_image

# ---------------------------------------------------------------- a call inside a call


def test_a_pullback_from_a_backward_hook_leaves_the_outer_call_its_own_settings():
    # The inner call set the graph's settings back to the session's when it returned: the
    # outer backward's later gates (all those nearer the input than the hooked layer) ran at
    # the session's T (0.3), not at the call's (2.0).
    net, x = every_op_net(), random_image()
    outer_fresh = pw.excitation_pullback(net, x, 3, temperature=2.0)
    inner_fresh = pw.excitation_pullback(net, x, 1, temperature=0.05)
    inner, hooked = [], []

    def hook(module, grad_input, grad_output):
        if not hooked:  # the inner call's own backward passes this hook too
            hooked.append(True)
            inner.append(session.pullback(1, temperature=0.05))

    # A full backward hook is bound in the forward: the session's cached one must see it.
    handle = net.conv4.register_full_backward_hook(hook)
    try:
        session = pw.PullbackSession(net, x, temperature=0.3)
        outer = session.pullback(3, temperature=2.0)
    finally:
        handle.remove()
    assert len(inner) == 1
    torch.testing.assert_close(inner[0], inner_fresh)
    torch.testing.assert_close(outer, outer_fresh)
    # And the session's own settings are back for a later call.
    torch.testing.assert_close(session.pullback(3),
                               pw.excitation_pullback(net, x, 3, temperature=0.3))


@pytest.mark.parametrize("targets", [b"\x01\x02", bytearray(b"\x01\x02"),
                                     memoryview(b"\x01\x02")])
def test_pullbacks_refuses_bytes_as_a_list_of_classes(targets):
    session = pw.PullbackSession(every_op_net(), random_image())
    with pytest.raises(TypeError, match="non-empty list of targets"):
        session.pullbacks(targets)


# ---------------------------------------------------------------- the synthetic shapes


def _painted_batches(monkeypatch) -> list[int]:
    """The batch of every background noise map make_dataset paints from now on."""
    painted = []
    interpolate = synthetic.F.interpolate

    def recording(grid, *args, **kwargs):
        painted.append(grid.shape[0])
        return interpolate(grid, *args, **kwargs)

    monkeypatch.setattr(synthetic.F, "interpolate", recording)
    return painted


def test_a_few_images_paint_only_those_images_and_are_the_blocks_first(monkeypatch):
    # make_dataset(1, size=2048) painted all 64 images of the block (3.2 GB a tensor, several
    # at once) to return one; evaluate --synthetic allows 9 at that size as "0.5 GB at most".
    whole = synthetic.make_dataset(70, size=40, seed=9)
    painted = _painted_batches(monkeypatch)
    few = synthetic.make_dataset(3, size=40, seed=9)
    assert max(painted) == 3
    painted.clear()
    again = synthetic.make_dataset(70, size=40, seed=9)
    assert max(painted) == 64 and sum(painted) == 3 * 70  # three octaves each
    for a, b, c in zip(whole, few, again):
        assert torch.equal(a[:3], b) and torch.equal(a, c)


def test_more_images_than_memory_holds_is_a_clear_error_before_any_is_painted(monkeypatch):
    # It painted block after block (2**62 images: forever) until the machine ran out.
    def painting(*args, **kwargs):
        raise AssertionError("painted before knowing the images fit")

    monkeypatch.setattr(synthetic, "_generate", painting)
    with pytest.raises(pw.PullbackWidgetsError, match="GB"):
        synthetic.make_dataset(10 ** 12)
