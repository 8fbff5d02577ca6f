"""Hostile review of resource lifetimes: threads, retained graphs, widgets, hooks and modes.

The promises: whatever opens a thread or holds a graph has a ``close()`` that lets it all be
collected; a closed explorer keeps nothing heavy; a failed constructor leaves nothing running;
nothing of the package stays attached to the user's model (hooks, attributes, global hooks,
modes, saved-tensor hooks, thread-locals) after any call, successful or failed.

test_memory.py, test_hostile_io.py, test_cell_reruns.py and test_hostile_widgets3.py cover
the plain close paths (one explorer closed, collected, thread ended; closed twice; Ctrl-C in
``PullbackExplorer``'s constructor). This file adds what they do not.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import warnings
import weakref

import pytest
import torch
from ipywidgets.widgets.widget import _instances
from torch import nn

import pullback_widgets as pw
from pullback_widgets import session as session_module
from pullback_widgets.interception import _active_gating_mode
from pullback_widgets.model_helpers import LayerRecorder, feature_layers
from pullback_widgets.widgets import ascent as ascent_module
from pullback_widgets.widgets.common import LatestOnlyWorker
from tests.conftest import LABELS, every_op_net, random_image

_HOOK_DICTS = sorted(name for name in dir(nn.modules.module)
                     if name.startswith("_global_") and isinstance(
                         getattr(nn.modules.module, name), dict))


def _workers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "pullback-widgets-worker"]


def _open_widgets() -> int:
    return len(_instances)


@pytest.fixture
def tidy():
    """Closes what a failing test leaked (a worker nobody can reach but through its thread,
    widgets left open), so that the tests after it count from a clean state."""
    threads, widgets = set(_workers()), set(_instances)
    yield
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        leaked = [o for o in gc.get_objects() if isinstance(o, LatestOnlyWorker)
                  and o._thread not in threads and o._thread.is_alive()]
    for worker in leaked:
        owner = getattr(worker._job, "__self__", None)
        (owner.close if owner is not None else worker.close)()
        worker.close()
    for key in set(_instances) - widgets:
        widget = _instances.get(key)
        if widget is not None:
            widget.close()


def _package_state(model: nn.Module) -> dict:
    """Everything of the package's that could stay behind, on the model and in this thread."""
    return {
        "global hooks": {name: len(getattr(nn.modules.module, name)) for name in _HOOK_DICTS},
        "module hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks),
                          len(m._backward_hooks), len(m._backward_pre_hooks),
                          len(m._forward_hooks_with_kwargs), len(m._state_dict_hooks))
                         for m in model.modules()],
        "attributes": [sorted(vars(m)) for m in model.modules()],
        "training": [m.training for m in model.modules()],
        "grads": [p.grad is None for p in model.parameters()],
        "modes": torch._C._len_torch_function_stack(),
        "saved-tensor hooks": torch._C._autograd._top_saved_tensors_default_hooks(False),
        "saved-tensor hooks on": torch._C._autograd._saved_tensors_hooks_is_enabled(),
        "grad mode": (torch.is_grad_enabled(), torch.is_inference_mode_enabled()),
        "quiet": getattr(session_module._QUIET, "on", False),
        "gating": _active_gating_mode(),
    }


class _Fails(nn.Module):
    """The reference net, raising ``error`` in every forward that runs with autograd on (the
    package's plain forwards, for class counts and layer shapes, run under no_grad)."""

    def __init__(self, error: type[BaseException], dtype=torch.float32) -> None:
        super().__init__()
        self.net = every_op_net(dtype=dtype)
        self.error = error
        self.input_size = 32

    def forward(self, x):
        if torch.is_grad_enabled():
            raise self.error("the model failed")
        return self.net(x)


@pytest.fixture
def threads_quiet(monkeypatch):
    """A worker ended by a KeyboardInterrupt prints it through threading.excepthook."""
    escaped: list = []
    monkeypatch.setattr(threading, "excepthook", lambda hook: escaped.append(hook.exc_type))
    return escaped


# ================================================================ real problems (fail now)

@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_ascent_explorer_whose_gating_check_fails_leaves_no_worker_running(error, tidy):
    # AscentExplorer.__init__ starts its worker, then runs _check_gating (a PullbackSession on
    # the start image), sync_figure, resend_on_new_views and close_earlier_runs with no
    # try/except: any failure there (a model that fails with autograd on, a Ctrl-C) left the
    # worker thread running for good. The caller never gets the explorer, so nothing can close
    # it; the thread holds the explorer, its model and its ~90 open widgets until the kernel
    # restarts. (PullbackExplorer closes itself there; AscentExplorer did not.)
    workers, widgets = len(_workers()), _open_widgets()
    model = _Fails(error)
    model_ref = weakref.ref(model)
    with pytest.raises(error, match="the model failed"):
        pw.AscentExplorer(model, "coffee", labels=LABELS)
    del model
    gc.collect()
    assert len(_workers()) == workers, "a worker thread outlived the failed constructor"
    assert _open_widgets() <= widgets, "the failed explorer's widgets stayed open"
    assert model_ref() is None, "the failed explorer (through its thread) keeps the model"


def test_ascent_explorer_ctrl_c_while_closing_an_earlier_run_leaves_no_worker(
        net, monkeypatch, tidy):
    # As test_hostile_widgets3's test for PullbackExplorer: closing the explorer of a cell's
    # earlier run waits for its worker; a Ctrl-C there left the new AscentExplorer, which the
    # caller never got, with its worker thread running.
    workers = len(_workers())

    def interrupted(explorer):
        raise KeyboardInterrupt

    monkeypatch.setattr(ascent_module, "close_earlier_runs", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pw.AscentExplorer(net, "coffee", labels=LABELS)
    gc.collect()
    assert len(_workers()) == workers


@pytest.mark.parametrize("cls", [pw.PullbackExplorer, pw.AscentExplorer])
def test_a_closed_explorer_keeps_no_model(cls, tidy):
    # close() drops the session, images and results, but kept self.model (and, in
    # PullbackExplorer, self._prepared.model). An explorer made from a registry name loads its
    # own copy of the model on each run of its cell; a closed one that something still holds
    # (IPython's Out[n] / _ when the explorer was the cell's last expression, a list of
    # explorers, a variable) kept that copy alive: re-running `pw.PullbackExplorer("resnet50")`
    # a dozen times kept a dozen ResNet-50s, the very thing cell_reruns.py closes explorers to
    # avoid.
    explorer = cls("shapes", "coffee")
    if cls is pw.PullbackExplorer:
        assert explorer.wait(30)
    model = weakref.ref(explorer.model)
    explorer.close()
    gc.collect()
    assert model() is None, "the closed explorer still holds the model it loaded"


@pytest.mark.parametrize("cls", [pw.PullbackExplorer, pw.AscentExplorer])
def test_a_constructor_refusing_its_gate_leaves_no_widgets_open(net, cls, tidy):
    # The gate is checked after the first dozens of widgets were made (for AscentExplorer also
    # after the model's layers were found): a typo in gate= left 35 (PullbackExplorer) or 52
    # (AscentExplorer) widgets in ipywidgets' registry per call, which the user cannot close.
    widgets = _open_widgets()
    with pytest.raises(pw.PullbackWidgetsError, match="gate"):
        cls(net, "coffee", labels=LABELS, gate="no such gate")
    gc.collect()
    assert _open_widgets() == widgets


# ================================================================ guards (pass now)

@pytest.mark.parametrize("cls", [pw.PullbackExplorer, pw.AscentExplorer])
def test_many_explorers_closed_while_computing_leak_nothing(net, cls):
    # (tqdm starts one monitor thread of its own per process: worker threads are counted.)
    workers, widgets = len(_workers()), _open_widgets()
    references = []
    for i in range(12):
        explorer = cls(net, "coffee", labels=LABELS, temperature=0.5)
        if cls is pw.AscentExplorer:
            explorer.steps.value = 3
            explorer.run()
        else:
            explorer.temperature.value = 0.9
            explorer._on_strip()
        if i % 3 == 0:
            assert explorer.wait(30)
        explorer.close()
        if i % 2:
            explorer.close()
        references.append(weakref.ref(explorer))
        del explorer
    gc.collect()
    assert len(_workers()) == workers
    assert _open_widgets() <= widgets
    assert all(reference() is None for reference in references)


def test_a_pullback_explorer_whose_worker_was_interrupted_is_collected(net, threads_quiet):
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS)
    assert explorer.wait(30)
    interrupt = net.register_forward_pre_hook(
        lambda module, args: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        explorer.image.value = "rocket"  # a new forward: the hook interrupts it
        assert explorer.wait(30)
        explorer._worker._thread.join(60)
    finally:
        interrupt.remove()
    assert threads_quiet == [KeyboardInterrupt]
    assert "KeyboardInterrupt" in explorer.status.value
    assert not _workers() or all(t is not explorer._worker._thread for t in _workers())
    reference = weakref.ref(explorer)
    explorer.close()
    del explorer
    gc.collect()
    assert reference() is None


def test_an_ascent_explorer_closed_on_its_worker_keeps_no_result(net, tidy):
    # close() from the worker's thread (an observer of one of the explorer's widgets, which
    # the worker's updates call: here "close once the progress bar reaches 2") may only ask
    # the worker to stop, and sets result = None at once; the run then stopped, and _ascend
    # set self.result to the stopped run's frames after the close: a closed explorer kept its
    # trajectory (every frame of the batch) for as long as anything held it.
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS)
    explorer.steps.value = 10
    explorer.progress.observe(lambda change: explorer.close() if change["new"] == 2 else None,
                              names="value")
    assert explorer.run()
    explorer._worker._thread.join(60)
    assert explorer._closed and not explorer._worker.alive  # it did stop
    assert explorer.progress.value == 2
    assert explorer.result is None, "the closed explorer took the stopped run's result"


def test_a_worker_closed_from_inside_its_job_lets_its_owner_go():
    class Owner:
        def job(self, request):
            worker.close()  # from its own thread: must not wait for itself

    owner = Owner()
    worker = LatestOnlyWorker(owner.job, on_error=lambda error, request: None)
    reference = weakref.ref(owner)
    worker.submit("close yourself")
    worker._thread.join(60)
    del owner
    gc.collect()
    assert not worker.alive and reference() is None


def _raising_model(error: type[BaseException]) -> nn.Module:
    class Raising(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = every_op_net()

        def forward(self, x):
            self.net.conv1(x)
            raise error("inside the model")

    return Raising()


def _failing_calls(model: nn.Module, x: torch.Tensor):
    yield lambda: pw.excitation_pullback(model, x, 99)  # no such class
    yield lambda: pw.excitation_pullback(model, x, pw.Unit("no_such_layer", 0))
    yield lambda: pw.excitation_pullback(model, x, pw.Unit("conv4", 10_000))
    yield lambda: pw.PullbackSession(model, x, layers=["no_such_layer"])
    yield lambda: pw.PullbackSession(model, x).pullbacks([0, 99])
    yield lambda: pw.PullbackSession(model, x).pullback(pw.Unit("conv2", 0), gate="no such")
    yield lambda: pw.pullback_ascent(model, x, 99, steps=2, progress=False)
    yield lambda: feature_layers(model, x[:, :1])  # a 1-channel image the net refuses


def test_failed_engine_calls_leave_nothing_on_the_model_or_the_thread():
    model, x = every_op_net(), random_image()
    before = _package_state(model)
    for call in _failing_calls(model, x):
        with pytest.raises(Exception):  # noqa: B017 (each its own error)
            call()
        assert _package_state(model) == before
    pw.excitation_pullback(model, x, 1)  # and a call that succeeds
    assert _package_state(model) == before


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_a_model_that_raises_leaves_nothing_behind(error):
    model, x = _raising_model(error), random_image()
    model.net.conv2.register_forward_hook(lambda *args: None)  # the user's own hook stays
    model.train()
    before = _package_state(model)
    calls = [lambda: pw.excitation_pullback(model, x, 0),
             lambda: pw.PullbackSession(model, x, layers=["net.conv2", "net.fc"]),
             lambda: feature_layers(model, x),
             lambda: feature_layers(model, x, every=True),
             lambda: pw.pullback_ascent(model, x, pw.Unit("net.conv2", 0), steps=1,
                                        progress=False),
             lambda: pw.ExcitationPullback(model).attribute(x, target=0)]
    for call in calls:
        with session_module.notices_unwarned(), pytest.raises(error, match="inside the model"):
            call()
        assert _package_state(model) == before


def test_a_ctrl_c_in_a_backward_leaves_nothing_behind():
    model, x = every_op_net(), random_image()
    before = _package_state(model)
    session = pw.PullbackSession(model, x)
    live = session._live.gate

    def interrupt(grad):
        raise KeyboardInterrupt

    handle = session._state.logits.register_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        session.pullback(0, gate="hard")
    handle.remove()
    assert session._live.gate == live  # the session's own settings back on its graph
    assert _package_state(model) == before
    torch.testing.assert_close(session.pullback(0), pw.excitation_pullback(model, x, 0))


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt, GeneratorExit])
def test_soft_gating_left_by_an_exception_leaves_nothing_behind(error):
    model, x = every_op_net(), random_image()
    before = _package_state(model)
    with pytest.raises(error), pw.soft_gating(model):
        model(x.clone().requires_grad_())
        raise error()
    assert _package_state(model) == before
    # An abandoned context (entered, never exited) goes with its generator.
    context = pw.soft_gating(model)
    context.__enter__()
    assert _active_gating_mode() is not None
    del context
    gc.collect()
    assert _package_state(model) == before


def test_soft_gating_inside_saved_tensor_hooks_restores_them():
    model, x = every_op_net(), random_image()
    with torch.autograd.graph.save_on_cpu():
        hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
        with pytest.raises(RuntimeError, match="stop"), pw.soft_gating(model):
            model(x.clone().requires_grad_())
            raise RuntimeError("stop")
        assert torch._C._autograd._top_saved_tensors_default_hooks(False) == hooks
    assert _package_state(model)["saved-tensor hooks"] is None
    assert torch._C._autograd._saved_tensors_hooks_is_enabled()


def test_a_layer_recorder_that_fails_half_way_removes_its_hooks():
    model = every_op_net()
    model.conv2.register_forward_hook(lambda *args: None)  # a per-module hook is taken
    before = _package_state(model)
    with pytest.raises(pw.PullbackWidgetsError, match="unknown layer"):
        LayerRecorder(model, ["conv1", "conv2", "no_such_layer"])
    assert _package_state(model) == before
    with LayerRecorder(model, ["conv1", "conv2"]) as recorder:
        model(random_image())
    assert set(recorder.outputs) == {"conv1", "conv2"}
    assert _package_state(model) == before


def test_an_ascent_stopped_by_its_callback_keeps_no_graph_and_no_session():
    model, x = every_op_net(), random_image(1)
    before = _package_state(model)
    sessions: list[weakref.ref] = []
    make = session_module.PullbackSession.__init__

    def counted(self, *args, **kwargs):
        sessions.append(weakref.ref(self))
        make(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_module.PullbackSession, "__init__", counted)
        result = pw.pullback_ascent(model, x, pw.Unit("conv4", 1), steps=20, progress=False,
                                    callback=lambda step, result: step == 3)
    gc.collect()
    assert result.stopped and len(result.images) == 4 and len(sessions) == 4
    assert all(reference() is None for reference in sessions)
    assert all(not image.requires_grad for image in result.images)
    assert result.logits.grad_fn is None
    assert _package_state(model) == before


def test_an_ascent_interrupted_in_its_callback_leaves_nothing_behind():
    model, x = every_op_net(), random_image(1)
    before = _package_state(model)

    def interrupt(step, result):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pw.pullback_ascent(model, x, 0, steps=3, progress=True, callback=interrupt)
    assert _package_state(model) == before


def test_notices_unwarned_is_restored_after_an_exception():
    with session_module.notices_unwarned():
        with contextlib.suppress(RuntimeError), session_module.notices_unwarned():
            raise RuntimeError
        assert session_module._QUIET.on is True  # the outer context's value
    assert getattr(session_module._QUIET, "on", False) is False


def test_repeated_failing_and_succeeding_calls_do_not_grow_the_live_tensors():
    model, x = every_op_net(), random_image()

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance wakes deprecated lazy torch attributes
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    def round_of_calls() -> None:
        for call in _failing_calls(model, x):
            with contextlib.suppress(Exception):
                call()
        session = pw.PullbackSession(model, x, layers=["conv4"])
        session.pullbacks([0, pw.Unit("conv4", 2)])
        pw.excitation_pullback(model, x, pw.Unit("conv2", 1))

    round_of_calls()  # warm-up: caches, lazily made tensors
    before = live_tensors()
    for _ in range(5):
        round_of_calls()
    assert live_tensors() <= before + 2
