"""The public entry points as third-party clients (Captum, Quantus) and users with their own
models call them: each test failed on the engine before this file, with a refusal of a form
Captum accepts, a deep error, or a silently different answer."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pullback_widgets as pw
from tests.conftest import assert_untouched, model_snapshot


def _small_net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 10)).to(dtype).eval()


class _Reshaped(nn.Module):
    """The small net with ``change`` applied to its logits (a model returning them wrongly)."""

    def __init__(self, change) -> None:
        super().__init__()
        self.net, self.change = _small_net(), change

    def forward(self, x):
        return self.change(self.net(x))


def _image(batch: int = 2, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(batch, 3, 14, 14, dtype=dtype)


# ---------------------------------------------------------------- Captum's target forms

@pytest.mark.parametrize("target", [torch.tensor([3]), (3,)], ids=["tensor1", "tuple1"])
def test_captums_one_class_forms_survive_its_batch_expanding_wrappers(target):
    # Captum reads a one-element tensor, or a 1-tuple, as one class for every example, and
    # its wrappers expand the batch but not such a target: NoiseTunnel on one image, or
    # sensitivity_max, got "target has 1 classes for a batch of 4".
    from captum.attr import NoiseTunnel, Saliency
    from captum.metrics import sensitivity_max

    model, x = _small_net(), _image(1)
    torch.manual_seed(5)
    ours = NoiseTunnel(pw.ExcitationPullback(model, gate="hard")).attribute(
        x, nt_type="smoothgrad", nt_samples=4, target=target)
    torch.manual_seed(5)
    saliency = NoiseTunnel(Saliency(model)).attribute(x, nt_type="smoothgrad", nt_samples=4,
                                                      target=target, abs=False)
    torch.testing.assert_close(ours, saliency)
    x2 = _image(2)
    method = pw.ExcitationPullback(model, temperature=0.5)
    torch.testing.assert_close(method.attribute(x2, target=target),
                               pw.excitation_pullback(model, x2, 3, temperature=0.5))
    assert sensitivity_max(method.attribute, x2, target=target, n_perturb_samples=2).shape == (2,)
    with pytest.raises(pw.PullbackWidgetsError, match="1 classes for a batch of 2"):
        method.attribute(x2, target=[3])  # a list is one class per example, for Captum too


# ---------------------------------------------------------------- the model's further arguments

class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU()
        self.fc = nn.Linear(4 * 12 * 12, 5)

    def forward(self, x, options):
        z = self.conv(x) * options["scale"].clone()
        options["scale"].add_(1.0)  # a forward that changes its argument in place
        return self.fc(self.relu(z).flatten(1))


def test_a_session_keeps_its_own_copy_of_the_forward_args():
    # A forward for a new layer ran on the caller's forward_args as they were by then (changed
    # by the caller, or by the first forward itself): the session's logits and every later
    # pullback silently became those of another input.
    model = _Scaled().double().eval()
    x, scale = _image(2), torch.ones(1, 4, 1, 1, dtype=torch.float64)
    session = pw.PullbackSession(model, x, forward_args=({"scale": scale},))
    assert torch.equal(scale, torch.ones_like(scale))  # the caller's tensor is left alone
    logits, before = session.logits.detach().clone(), session.pullback(1)
    scale.mul_(5.0)
    session.pullback(pw.Unit("conv", 0))  # a new forward, recording "conv"
    assert torch.equal(session.logits, logits)
    assert torch.equal(session.pullback(1), before)
    with torch.no_grad():
        expected = model(x, {"scale": torch.ones(1, 4, 1, 1, dtype=torch.float64)})
    assert torch.equal(logits, expected)


# ---------------------------------------------------------------- what the model returns

def test_integer_logits_are_named_as_such():
    with pytest.raises(pw.PullbackWidgetsTypeError, match=r"floating-point logits.*int64"):
        pw.excitation_pullback(_Reshaped(lambda y: y.round().long()), _image(), 1)


# ---------------------------------------------------------------- Quantus

def test_quantus_explain_func_on_a_bfloat16_model_returns_float32():
    # numpy has no bfloat16: the result's conversion raised a bare TypeError.
    model = _small_net(torch.bfloat16)
    x = _image(2, torch.float32)
    result = pw.quantus_explain_func(model, x.numpy(), np.array([3, 4]))
    assert result.dtype == np.float32 and result.shape == (2, 3, 14, 14)
    expected = pw.excitation_pullback(model, x.to(torch.bfloat16), [3, 4]).float()
    assert np.array_equal(result, expected.numpy())


def test_quantus_targets_keep_their_values_and_numpy_scalars_count():
    model, x = _small_net(), _image(2)
    for huge in (np.array([2 ** 63 + 3, 4], dtype=np.uint64), np.array([1e20, 4.0])):
        # a cast to int64 named -9223372036854775805 (or INT_MIN) as the bad class
        with pytest.raises(pw.PullbackWidgetsError, match=f"class {int(huge[0])} is out"):
            pw.quantus_explain_func(model, x.numpy(), huge)
    expected = pw.quantus_explain_func(model, x.numpy(), np.array([3, 3]))
    for one in (np.float64(3.0), np.array(3), np.array(3.0)):
        assert np.array_equal(pw.quantus_explain_func(model, x.numpy(), one), expected)


# ---------------------------------------------------------------- the user's backward hooks

def test_backward_hooks_keep_the_batched_default_off(monkeypatch):
    # On accelerators pullbacks() defaulted to one vmapped backward, which calls a module's
    # backward hook once, with vmap's batched tensors, which escape it (the GPU test below).
    model, x = _small_net(), _image()
    session = pw.PullbackSession(model, x)
    chosen: list[bool] = []
    monkeypatch.setattr(session, "_backward",
                        lambda targets, call, batched: chosen.append(batched))
    monkeypatch.setattr(session, "_inputs", x.to("meta"))  # as on an accelerator
    session.pullbacks([1, 2])
    handle = model[6].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    session.pullbacks([1, 2])
    handle.remove()
    handle = nn.modules.module.register_module_full_backward_pre_hook(lambda m, g: None)
    try:
        session.pullbacks([1, 2])
    finally:
        handle.remove()
    session.pullbacks([1, 2], batched=True)  # asked for: as asked
    assert chosen == [True, False, False, True]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the batched default is for GPUs")
def test_a_users_backward_hook_sees_each_pullback_on_the_gpu():
    model, x = _small_net(torch.float32).cuda(), _image(2, torch.float32).cuda()
    seen: list[torch.Tensor] = []
    handle = model[6].register_full_backward_hook(
        lambda module, grad_in, grad_out: seen.append(grad_out[0].clone()))
    try:
        session = pw.PullbackSession(model, x, temperature=0.5)
        maps = session.pullbacks([1, 2])
        assert len(seen) == 2 and all((g + 1).shape == (2, 10) for g in seen)
        assert torch.equal(seen[0][:, 1], torch.ones(2, device="cuda"))
        torch.testing.assert_close(maps[1], session.pullback(2))
    finally:
        handle.remove()


# ---------------------------------------------------------------- DataParallel

def _data_parallel_over(devices: list[int]) -> nn.DataParallel:
    parallel = nn.DataParallel(_small_net())
    parallel.device_ids = devices  # as over several GPUs (on a CPU machine it holds none)
    return parallel


def test_data_parallel_over_several_devices_runs_its_module_or_is_refused():
    # Its replicas run in worker threads, where the thread-local mode gates nothing: every
    # pullback was the plain gradient (a warning said no op was gated), Units were unrecorded.
    parallel, x = _data_parallel_over([0, 1]), _image()
    before = model_snapshot(parallel)
    expected = pw.excitation_pullback(parallel.module, x, 3, temperature=0.5)
    with pytest.warns(UserWarning, match="DataParallel"):
        assert torch.equal(pw.excitation_pullback(parallel, x, 3, temperature=0.5), expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # told once per model
        attribution = pw.ExcitationPullback(parallel, temperature=0.5).attribute(x, target=3)
        assert torch.equal(attribution, expected)
    with pytest.raises(pw.PullbackWidgetsTypeError, match=r"model\.module inside"), \
            pw.soft_gating(parallel):
        pass
    holder = nn.Sequential(_data_parallel_over([0, 1]))
    with pytest.raises(pw.PullbackWidgetsTypeError, match=r"submodule '0' is an nn\.DataParallel"):
        pw.excitation_pullback(holder, x, 3)
    assert_untouched(parallel, before)
    # Over one device (or none) it calls its module in this thread: run as it is.
    single = _data_parallel_over([])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(pw.excitation_pullback(single, x, 3, temperature=0.5),
                                   expected)


def test_logits_with_another_batch_than_the_inputs_are_refused():
    # Logits (num_classes, B), transposed by mistake, were read as num_classes examples of B
    # classes: class 1 pulled back the sum of a column, a map of another target.
    model, x = _Reshaped(lambda y: y.T), _image()
    for explain in (lambda: pw.excitation_pullback(model, x, 1),
                    lambda: pw.ExcitationPullback(model).attribute(x),
                    lambda: pw.quantus_explain_func(model, x.numpy(), np.array([1, 1])),
                    lambda: pw.model_helpers.predict(model, x)):
        with pytest.raises(pw.PullbackWidgetsError, match=r"shape \(10, 2\) for a batch of 2"):
            explain()

