"""A hostile user who changes the model between a session's calls, or hands it odd inputs:
changes the model record missed, and inputs whose own type broke the forward's bookkeeping.
Each test failed before its fix."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(5, 6)).double().eval()


def image() -> torch.Tensor:
    return torch.rand(1, 3, 16, 16, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))


class _NegatedReLU(nn.ReLU):
    def forward(self, value):
        return -F.relu(value)


def test_a_module_whose_class_is_swapped_is_a_changed_model():
    # ``module.__class__ = ...`` (how parametrize and some patching libraries change a
    # module's forward) keeps the module, its __dict__ and its tensors: the session answered
    # with the graph of the old ReLU, for class targets and recorded Units alike.
    model, x = small_cnn(), image()
    session = pw.PullbackSession(model, x, layers=["3"])
    session.pullback(2)
    model[1].__class__ = _NegatedReLU
    fresh = pw.excitation_pullback(copy.deepcopy(model), x, 2)
    assert not torch.allclose(session.logits, model(x))  # another model now
    assert not session.model_unchanged()
    with pytest.raises(pw.PullbackWidgetsError, match="module replaced"):
        session.pullback(2)
    with pytest.raises(pw.PullbackWidgetsError, match="module replaced"):
        session.pullback(pw.Unit("3", 1))
    torch.testing.assert_close(pw.PullbackSession(model, x).pullback(2), fresh)


class _KeepsItsType(torch.Tensor):
    """A tensor subclass whose operations return the subclass (torch's default)."""


@pytest.mark.parametrize("call", ["one-shot", "session", "ascent"])
def test_an_input_of_a_type_preserving_tensor_subclass_is_a_clear_error(call):
    # Its copy stayed of the subclass, whose leaf autograd reads through the subclass's
    # __torch_function__ (a view, not the leaf's accumulator): every call said the forward
    # ran under no_grad or detached its input, sending the user to look for what is not there.
    model, x = small_cnn(), image().as_subclass(_KeepsItsType)
    calls = {"one-shot": lambda: pw.excitation_pullback(model, x, 2),
             "session": lambda: pw.PullbackSession(model, x),
             "ascent": lambda: pw.pullback_ascent(model, x, 2, steps=1, progress=False)}
    with pytest.raises(pw.PullbackWidgetsTypeError, match=r"_KeepsItsType.*as_subclass"):
        calls[call]()
    plain = x.as_subclass(torch.Tensor)  # as the message says: the pullback of its values
    torch.testing.assert_close(pw.excitation_pullback(model, plain, 2),
                               pw.excitation_pullback(model, image(), 2))


def test_inputs_whose_copies_are_plain_tensors_still_work():
    # nn.Parameter and torchvision's tv_tensors.Image (its operations return plain tensors).
    from torchvision import tv_tensors
    model, x = small_cnn(), image()
    expected = pw.excitation_pullback(model, x, 2)
    for odd in (nn.Parameter(x.clone()), tv_tensors.Image(x.clone())):
        torch.testing.assert_close(pw.excitation_pullback(model, odd, 2), expected)
        torch.testing.assert_close(pw.PullbackSession(model, odd).pullback(2), expected)


def _norm_relu_cnn(dtype: torch.dtype) -> nn.Module:
    # An eval batch norm feeding a ReLU: the soft gate writes into its own buffer there.
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_pullback_under_allow_mutation_on_saved_tensors_is_the_pullback(dtype):
    # That context's dispatch mode reads every written argument as "out", and the sigmoid
    # gate wrote through softplus_backward's grad_input: torch's KeyError: 'out'.
    model, x = _norm_relu_cnn(dtype), image().to(dtype)
    expected = pw.excitation_pullback(model, x, 1)
    with torch.autograd.graph.allow_mutation_on_saved_tensors():
        got = pw.excitation_pullback(model, x, 1)
        session_got = pw.PullbackSession(model, x).pullback(1, temperature=0.5)
    assert torch.equal(got, expected)
    assert torch.equal(session_got, pw.excitation_pullback(model, x, 1, temperature=0.5))


@pytest.mark.parametrize("where", ["model", "submodule"])
def test_a_torch_export_program_is_refused_in_one_line(where):
    # It raised torch's bare "NotImplementedError: Calling eval() is not supported yet."
    model, x = small_cnn(), image()
    exported = torch.export.export(model, (x,)).module()
    wrapped = exported if where == "model" else nn.Sequential(exported)
    for call in (lambda: pw.excitation_pullback(wrapped, x, 1),
                 lambda: pw.PullbackSession(wrapped, x)):
        with pytest.raises(TypeError, match=r"torch\.export program's module\. .*Pass the eager"):
            call()


def test_an_ascent_whose_callback_changes_the_model_names_the_callback():
    # The next step's pullback was refused with "make a new PullbackSession", in a call where
    # the user made no session.
    model, x = small_cnn(), image()

    def ablate(step, result):
        with torch.no_grad():
            model[0].weight[0].zero_()

    with pytest.raises(pw.PullbackWidgetsError,
                       match=r"model changed during the ascent, by step 1 \(in the callback"):
        pw.pullback_ascent(model, x, 1, steps=3, callback=ablate, progress=False)


def test_an_ascent_refuses_a_model_changed_by_another_thread_between_its_steps():
    # A training cell run while a widget's worker ascends: each later step followed the new
    # model, with no error. The change comes in step 1's forward, after its session began.
    model, x = small_cnn(), image()
    forwards = []

    def train_once(module, inputs, output):
        forwards.append(1)
        if len(forwards) == 2:
            model[0].weight.data.mul_(0.5)  # as another thread would, through .data

    model[3].register_forward_hook(train_once)
    with pytest.raises(pw.PullbackWidgetsError, match="model changed during the ascent, by "
                                                      "step 1"):
        pw.pullback_ascent(model, x, 1, steps=3, progress=False)


def test_an_ascent_of_a_lazy_model_follows_the_model_its_first_forward_made():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.LazyLinear(3)).double().eval()
    result = pw.pullback_ascent(model, image(), 1, steps=2, progress=False)
    assert len(result.images) == 3
