"""Concurrency and model wrappers, tried as a hostile user would: other threads copying,
saving, tracing or running the model while the package runs its forward, and models whose
forward hands its parts to threads of their own. Threads meet at events, never at sleeps."""

from __future__ import annotations

import concurrent.futures
import copy
import io
import threading
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as checkpoint
from torch import nn

import pullback_widgets as pw
from pullback_widgets.model_helpers import feature_layers
from tests.conftest import assert_untouched, every_op_net, model_snapshot, random_image
from tests.reference import EveryOpNet


class _CallsBack(EveryOpNet):
    """The reference net, whose next forward first runs ``during`` (once)."""

    during: Callable[[], None] | None = None

    def forward(self, x):
        if self.during is not None:
            during, self.during = self.during, None
            during()
        return super().forward(x)


def _calls_back() -> _CallsBack:
    torch.manual_seed(0)
    return _CallsBack().double().eval()


def _in_another_thread(work: Callable[[], object]) -> Callable[[], None]:
    """A ``during`` that runs ``work`` in a thread of its own, to its end; its result (or
    error) lands in the returned function's ``result``."""
    def during() -> None:
        def run() -> None:
            try:
                during.result = work()
            except BaseException as error:
                during.result = error
        thread = threading.Thread(target=run)
        thread.start()
        thread.join(timeout=120)
    during.result = None
    return during


def test_a_copy_or_save_of_the_model_in_another_thread_during_a_unit_forward_is_clean():
    # The recorder hooked every module of the model while a Unit's forward ran: a
    # copy.deepcopy (which the package's own errors recommend) made meanwhile kept the
    # package's hooks for good, and torch.save(model) failed to pickle them.
    net, x = _calls_back(), random_image()
    expected = pw.excitation_pullback(net, x, pw.Unit("conv4", 1))
    before = model_snapshot(net)

    def copy_and_save() -> nn.Module:
        torch.save(net, io.BytesIO())
        return copy.deepcopy(net)

    net.during = _in_another_thread(copy_and_save)
    during = net.during
    assert torch.equal(pw.excitation_pullback(net, x, pw.Unit("conv4", 1)), expected)
    duplicate = during.result
    assert isinstance(duplicate, nn.Module), duplicate
    assert all(not module._forward_hooks for module in duplicate.modules())
    assert not torch.nn.modules.module._global_forward_hooks
    assert_untouched(net, before)


def test_a_layer_with_the_users_own_forward_hook_records_what_the_hook_returns():
    # The recorder's own hook runs after the user's on such a module: the layer's output is
    # the one the model goes on with (here cut to 3 channels).
    net, x = every_op_net(), random_image()
    handle = net.conv4.register_forward_hook(lambda module, args, out: out[:, :3])
    net.conv5 = nn.Conv2d(3, 8, 3, padding=1).double()
    try:
        assert feature_layers(net, x)["conv4"][0] == 3
        leaf = x.clone().requires_grad_()
        with pw.soft_gating(net, temperature=0.3):
            taken = {}
            inner = net.conv4.register_forward_hook(lambda m, a, out: taken.setdefault("o", out))
            try:
                net(leaf)
            finally:
                inner.remove()
            (expected,) = torch.autograd.grad(taken["o"][:, 2].mean((1, 2)).sum(), leaf)
        pullback = pw.excitation_pullback(net, x, pw.Unit("conv4", 2), temperature=0.3)
        torch.testing.assert_close(pullback, expected)
    finally:
        handle.remove()


class _Traced(nn.Module):
    """Holds torch.fx's trace of it (in another thread) open until ``release``."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        self.entered.set()
        assert self.release.wait(60)
        return self.head(F.relu(x))


def test_a_pullback_while_another_thread_traces_with_torch_fx_is_a_clear_error():
    # symbolic_trace puts its own nn.Module.__call__ in place for every thread while it runs:
    # the pullback's forward went into the user's graph (doubling its nodes) and failed with
    # "got Proxy" or fx's NameError "module is not installed as a submodule".
    net, x = every_op_net(), random_image()
    expected = pw.excitation_pullback(net, x, 1)
    before = model_snapshot(net)
    traced = _Traced()
    clean = len(torch.fx.symbolic_trace(_plain_twin(traced)).graph.nodes)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        trace = pool.submit(torch.fx.symbolic_trace, traced)
        try:
            assert traced.entered.wait(60)
            for explain in (lambda: pw.excitation_pullback(net, x, 1),
                            lambda: pw.PullbackSession(net, x, layers=["conv4"]),
                            lambda: pw.model_helpers.predict(net, x),
                            lambda: feature_layers(net, x)):
                with pytest.raises(pw.PullbackWidgetsError, match=r"torch\.fx is tracing"):
                    explain()
        finally:
            traced.release.set()
        graph = trace.result(timeout=60)
    assert len(graph.graph.nodes) == clean  # nothing of the package's forward in it
    assert_untouched(net, before)
    assert torch.equal(pw.excitation_pullback(net, x, 1), expected)


def _plain_twin(traced: _Traced) -> nn.Module:
    twin = _Traced()
    twin.release.set()
    twin.head = traced.head
    return twin


def test_plain_forwards_and_checkpoints_in_another_thread_are_neither_gated_nor_refused():
    # The gating mode and its refusal of checkpointing's saved-tensor hooks are the package
    # thread's own: the user's plain gradients meanwhile, checkpointed or not, stay plain.
    net, x = _calls_back(), random_image()
    other = every_op_net(seed=3)
    expected = pw.excitation_pullback(net, x, 1)

    def gradients() -> list[torch.Tensor]:
        grads = []
        for run in (other, lambda t: checkpoint.checkpoint(other, t, use_reentrant=False)):
            leaf = x.clone().requires_grad_()
            grads.append(torch.autograd.grad(run(leaf)[:, 1].sum(), leaf)[0])
        return grads

    plain = gradients()
    net.during = _in_another_thread(gradients)
    during = net.during
    assert torch.equal(pw.excitation_pullback(net, x, 1), expected)
    assert isinstance(during.result, list), during.result
    assert all(torch.equal(a, b) for a, b in zip(during.result, plain))


class _Ensemble(nn.Module):
    """Runs its members in worker threads of its own, as some ensembles do."""

    def __init__(self, pool: concurrent.futures.Executor) -> None:
        super().__init__()
        self.pool = pool
        self.a, self.b = every_op_net(0), every_op_net(1)

    def forward(self, x):
        a, b = self.pool.submit(self.a, x), self.pool.submit(self.b, x)
        return a.result() + b.result()


def test_a_model_running_its_parts_in_worker_threads_is_told_why_nothing_was_gated():
    # The mode gates the thread that runs the forward: the notice listed TorchScript and C++
    # extensions as where the gates went unseen, never the model's own threads.
    with concurrent.futures.ThreadPoolExecutor(2) as pool, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = pw.PullbackSession(_Ensemble(pool), random_image())
    assert session.gated_calls == 0 and session.plain_gate_ops["ReLU"] == 10
    assert any("another thread" in str(warning.message) for warning in caught)
