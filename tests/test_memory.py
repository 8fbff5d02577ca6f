"""Small versions of the soak test: nothing keeps old sessions, graphs or images alive."""

import gc
import warnings
import weakref

import torch

import pullback_widgets as pw
from tests.reference import EveryOpNet

LABELS = ["ant", "bee", "cat", "dog", "eel"]


def _net() -> EveryOpNet:
    torch.manual_seed(0)
    model = EveryOpNet().eval()
    model.input_size = 32
    return model


def test_discarded_sessions_free_their_graphs():
    net = _net()
    refs = []
    for i in range(20):
        session = pw.PullbackSession(net, torch.rand(2, 3, 16, 16), layers=["conv4"])
        session.pullbacks([i % 5, pw.Unit("conv4", 1)])
        # The session's own logits: its property hands out copies.
        refs.append(weakref.ref(session._state.logits))
        refs.append(weakref.ref(session))
    del session
    gc.collect()
    assert all(ref() is None for ref in refs)


def test_ascent_keeps_no_graph():
    net = _net()
    result = pw.pullback_ascent(net, torch.rand(1, 3, 16, 16), 1, steps=3, progress=False)
    assert all(image.grad_fn is None and not image.requires_grad for image in result.images)
    assert result.logits.grad_fn is None


def test_explorer_updates_and_image_changes_do_not_accumulate():
    explorer = pw.PullbackExplorer(_net(), "coffee", labels=LABELS)
    explorer.wait()
    replaced = []
    images = list(pw.SAMPLE_IMAGES)
    for i in range(40):
        if i % 8 == 0:
            replaced.append(weakref.ref(explorer._session))
            explorer.image.value = images[(i // 8 + 1) % len(images)]
        else:
            explorer.temperature.value = 0.05 * (1 + i)
        explorer.wait()
    gc.collect()
    assert all(ref() is None for ref in replaced)
    assert "⚠" not in explorer.status.value


def test_tensor_count_is_stable_across_repeated_updates():
    explorer = pw.PullbackExplorer(_net(), "coffee", labels=LABELS)
    explorer.wait()

    def live_tensors() -> int:
        gc.collect()
        with warnings.catch_warnings():  # isinstance wakes deprecated lazy torch attributes
            warnings.simplefilter("ignore")
            return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    for value in (0.1, 0.2):  # warm-up
        explorer.temperature.value = value
        explorer.wait()
    before = live_tensors()
    for i in range(30):
        explorer.temperature.value = 0.3 + 0.1 * i
        explorer.wait()
    assert live_tensors() <= before + 2
