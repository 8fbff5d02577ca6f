"""A fourth hostile review of the widgets' Python side: a model changed under an open ascent
explorer, bursts of changes, closing while a job runs, errors mid-update, odd typed values,
and the numbers shown beside the maps."""

import threading

import pytest
import torch

import pullback_widgets as pw
from tests.conftest import LABELS

# ---------------------------------------------------------------- the model changes meanwhile

@pytest.mark.parametrize("classes", [2, 10])
def test_an_ascent_explorer_on_a_model_given_a_new_head_is_a_clear_error(net, classes):
    # The user swaps in a new head in a later cell: the ascent explorer named the new head's
    # classes with the old names ("bee" for class 1 of a 2-class head: a silent wrong
    # answer), or failed with "IndexError: list index out of range" for a class >= 5.
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    try:
        explorer.steps.value = 1
        torch.manual_seed(classes)
        net.fc = torch.nn.Linear(8, classes)
        for target in ("", "eel (4)"):
            explorer.target.value = target
            assert explorer.run() and explorer.wait()
            assert "⚠" in explorer.status.value, explorer.status.value
            assert f"now has {classes} classes, not the 5" in explorer.status.value
    finally:
        explorer.close()


# ---------------------------------------------------------------- errors mid-update

def test_a_temperature_strip_that_fails_does_not_fail_every_later_change(net, monkeypatch):
    # The strip's request stayed pending after it failed: every later change of the controls
    # computed the 7-panel strip again (the slowest job, also after a Ctrl-C had stopped it)
    # and failed again, so the status line showed the strip's error for ever, over maps of
    # other settings.
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    try:
        assert explorer.wait()
        pullback, calls = pw.PullbackSession.pullback, []

        def fails_at_ten(self, target, **settings):
            calls.append(settings.get("temperature"))
            temperature = settings.get("temperature")
            if isinstance(temperature, dict) and temperature.get("relu") == 10.0:
                raise pw.PullbackWidgetsError("no strip today")
            return pullback(self, target, **settings)

        monkeypatch.setattr(pw.PullbackSession, "pullback", fails_at_ten)
        explorer.strip_button.click()
        assert explorer.wait() and "no strip today" in explorer.status.value
        assert explorer.strip_box.layout.display == "none"
        calls.clear()
        explorer.temperature_control.up.click()
        assert explorer.wait()
        assert "⚠" not in explorer.status.value, explorer.status.value
        assert f"T = {explorer.temperature.value:.3g}" in explorer.status.value
        assert len(calls) == 1  # the new pullback only
        monkeypatch.setattr(pw.PullbackSession, "pullback", pullback)
        explorer.strip_button.click()  # asked again, it is computed
        assert explorer.wait() and "⚠" not in explorer.status.value
        assert explorer.strip_box.layout.display is None
        assert len(explorer.strip_figure.data) == 7
    finally:
        explorer.close()


class _Unprintable(Exception):
    def __str__(self):
        return self.detail  # the user's bug: no such attribute


class _RaisesWhenAsked(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.input_size, self.fail = inner, 32, False

    def forward(self, x):
        if self.fail:
            raise _Unprintable()
        return self.inner(x)


@pytest.mark.parametrize("cls", [pw.PullbackExplorer, pw.AscentExplorer])
def test_an_error_that_cannot_be_printed_still_reaches_the_status_line(net, cls):
    # The user's model raised an exception whose __str__ itself fails: writing the status
    # line failed in turn (a traceback in the kernel's log), and the status stayed at
    # "computing …" for ever, as if the explorer were still busy.
    model = _RaisesWhenAsked(net).eval()
    explorer = cls(model, "coffee", labels=LABELS, temperature=0.5)
    try:
        assert explorer.wait()
        model.fail = True
        if cls is pw.AscentExplorer:
            explorer.steps.value = 1
            assert explorer.run()
        else:
            explorer.image.value = "chelsea"
        assert explorer.wait()
        assert "⚠ _Unprintable" in explorer.status.value, explorer.status.value
        assert "computing" not in explorer.status.value
        model.fail = False  # later updates work
        if cls is pw.AscentExplorer:
            assert explorer.run()
        else:
            explorer.temperature_control.up.click()
        assert explorer.wait() and "⚠" not in explorer.status.value, explorer.status.value
    finally:
        explorer.close()


# ---------------------------------------------------------------- steps on the way

def test_a_top5_click_from_a_hidden_unit_requests_only_the_class_clicked(net):
    # With a layer chosen, a Top-5 button set the Layer box to the logits, then the Target
    # box: the first change sent its own request, the pullback of the old target (here the
    # predicted class), which the worker computed and drew before the class clicked.
    explorer = pw.PullbackExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    try:
        assert explorer.wait()
        explorer.layer.value = "conv4"
        explorer.channel.value = 3
        assert explorer.wait()
        sent, submit = [], explorer._worker.submit
        explorer._worker.submit = lambda request: (sent.append(request), submit(request))[1]
        button = next(b for b in explorer.top_buttons if b.class_index == 4)
        button.click()
        assert explorer.wait()
        assert [(request.layer, request.target_text) for request in sent] == [("", "eel (4)")]
        assert explorer.pullback_figure.layout.title.text.startswith("Pullback of ⁨eel⁩")
        assert explorer.target.value == "eel (4)" and explorer.channel.disabled
    finally:
        explorer.close()


# ---------------------------------------------------------------- the worker

def test_a_request_made_while_an_interrupt_unwinds_the_job_is_computed():
    # A Ctrl-C in a job ends the worker's thread; a request submitted while the interrupt
    # unwound the job (the model's context managers restoring it) found the thread not yet
    # marked as ended, waited for a thread that was gone, and was never computed: the
    # explorer stayed at "computing …" until the next change of a control.
    from pullback_widgets.widgets.common import LatestOnlyWorker

    seen, stopped = [], []

    def job(request):
        try:
            if request == "interrupt":
                raise KeyboardInterrupt
        finally:
            if request == "interrupt":  # the kernel's thread, at the worst moment
                worker.submit("meanwhile")
        seen.append(request)

    worker = LatestOnlyWorker(job, on_error=lambda *args: None,
                              on_interrupt=lambda error, request: stopped.append(request))
    interrupted = worker._thread
    original = threading.excepthook
    threading.excepthook = lambda hook: None
    try:
        worker.submit("interrupt")
        assert worker.wait()
        assert seen == ["meanwhile"] and stopped == ["interrupt"]
    finally:
        # The interrupted thread reaches threading.excepthook after the job: the quiet hook
        # stays until it has (else pytest's reports it, in whichever test runs then).
        interrupted.join(60)
        threading.excepthook = original
        worker.close()
    assert not worker.alive


def test_a_run_interrupted_part_way_leaves_the_frame_slider_on_its_own_frames(net):
    # A Ctrl-C (a KeyboardInterrupt from the model) part-way through a run left the Frame
    # slider enabled over the previous run's 10 frames while the result held this run's 2:
    # most of the slider drew nothing, and where the last run had fewer frames than this
    # one, this run's last frames could not be reached.
    explorer = pw.AscentExplorer(net, "coffee", labels=LABELS, temperature=0.5)
    calls = []

    def hook(module, args):
        calls.append(1)
        if len(calls) > 3:  # the predicted class, steps 0 and 1; step 2 is interrupted
            raise KeyboardInterrupt

    original = threading.excepthook
    threading.excepthook = lambda hook: None
    try:
        explorer.steps.value = 10
        assert explorer.run() and explorer.wait()
        assert explorer.frame.max == 10
        handle = net.register_forward_pre_hook(hook)
        interrupted = explorer._worker._thread
        try:
            assert explorer.run() and explorer.wait()
        finally:
            handle.remove()
        interrupted.join(60)  # it reaches threading.excepthook after the job: quiet until then
        assert "KeyboardInterrupt" in explorer.status.value
        result = explorer.result
        assert len(result.images) == len(result.logits) == 2
        assert explorer.frame.max == 1 and explorer.frame.value == 1
        assert not explorer.frame.disabled and not explorer.run_button.disabled
        for index in (0, 1):
            explorer.frame.value = index
            assert f"step {index} " in explorer.frames_figure.layout.annotations[0].text
    finally:
        threading.excepthook = original
        explorer.close()
