"""Helpers shared by the test files: the small reference net, images, and model snapshots.

Import them explicitly (``from tests.conftest import every_op_net``), so a reader sees where
each comes from.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pullback_widgets.interception import _active_gating_mode
from tests.reference import EveryOpNet

#: Class names of the reference net's five outputs, for the widget tests.
LABELS = ["ant", "bee", "cat", "dog", "eel"]


@pytest.fixture
def net() -> EveryOpNet:
    """The reference net in float32, sized for the explorers (input_size 32)."""
    model = every_op_net(dtype=torch.float32)
    model.input_size = 32
    return model


def every_op_net(seed: int = 0, dtype: torch.dtype = torch.float64) -> EveryOpNet:
    """The reference net with every gated op (ReLU forms, padded and ceil-mode pools), eval."""
    torch.manual_seed(seed)
    return EveryOpNet().to(dtype).eval()


def random_image(batch: int = 2, size: int = 12, seed: int = 1,
                 dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """(batch, 3, size, size) uniform in [0, 1)."""
    torch.manual_seed(seed)
    return torch.rand(batch, 3, size, size, dtype=dtype)


def plain_gradient(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    """Autograd's own gradient of the target logit, summed over the batch."""
    x = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


def markup_named_cnn() -> nn.Module:
    """A tiny 32-px CNN of 3 classes whose only convolution is named "<b>conv</b><br>FAKE":
    markup that titles must not draw."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("<b>conv</b><br>FAKE", nn.Conv2d(3, 4, 3, padding=1))
    for name, module in (("relu", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)),
                         ("flat", nn.Flatten()), ("fc", nn.Linear(4, 3))):
        model.add_module(name, module)
    model.eval().input_size = 32
    return model


def model_snapshot(model: nn.Module) -> dict:
    """Everything the package promises to leave as it found it."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for m in model.modules()],
        "modules": [type(m) for m in model.modules()],
    }


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = model_snapshot(model)
    assert before["state"].keys() == after["state"].keys()
    for key in before["state"]:
        assert torch.equal(before["state"][key], after["state"][key]), key
    for field in ("training", "requires_grad", "hooks", "modules"):
        assert before[field] == after[field], field
    assert all(g is None for g in after["grads"])
    assert _active_gating_mode() is None

