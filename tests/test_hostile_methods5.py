"""A hostile review of the comparison methods (evaluation/methods.py): guided backprop and
guided Grad-CAM against hand-written references on a residual ReLU network, one image alone
against its row of the batch, and guided backprop on networks whose activations Captum does
not guide (where the map was the plain gradient under guided backprop's name)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pullback_widgets.evaluation import methods as ev
from pullback_widgets.synthetic import ShapesNet
from pullback_widgets.validation import PullbackWidgetsError

pytest.importorskip("captum.attr")


class _GuidedClamp(torch.autograd.Function):
    """Guided backprop's ReLU (Springenberg et al. 2015): the forward's mask times the
    positive part of the incoming gradient; ``high`` for ReLU6 (its upper flat part too)."""

    @staticmethod
    def forward(ctx, z, high):
        ctx.save_for_backward(z)
        ctx.high = high
        return z.clamp_min(0) if high is None else z.clamp(0, high)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        passed = z > 0 if ctx.high is None else (z > 0) & (z < ctx.high)
        return grad.clamp_min(0) * passed, None


class _GuidedReLU(nn.Module):
    def __init__(self, high: float | None = None) -> None:
        super().__init__()
        self.high = high

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return _GuidedClamp.apply(z, self.high)


def _guided_reference(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Each image's input gradient of its class through guided ReLUs, one image at a time."""
    guided = copy.deepcopy(model)
    for parent in list(guided.modules()):
        for name, child in parent.named_children():
            if type(child) is nn.ReLU6:
                setattr(parent, name, _GuidedReLU(6.0))
            elif type(child) is nn.ReLU:
                setattr(parent, name, _GuidedReLU())
    maps = []
    for image, cls in zip(x, target.tolist()):
        image = image[None].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(guided(image)[0, cls], image)
        maps.append(grad)
    return torch.cat(maps)


def _grad_cam_reference(model: nn.Module, layer: str, x: torch.Tensor,
                        target: torch.Tensor) -> torch.Tensor:
    """Selvaraju et al.'s formula at ``layer``: ReLU(Σ_k mean(∂y/∂A_k) A_k), upsampled
    bilinearly (half-pixel centres) to the input, (B, 1, H, W)."""
    taken = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda module, args, out: taken.append(out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[torch.arange(len(x)), target].sum(), taken[0])
    cam = F.relu((grad.mean((2, 3), keepdim=True) * taken[0]).sum(1, keepdim=True))
    return F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).detach()


def _shapes_net() -> nn.Module:
    """The shapes model's architecture (residual blocks, max-pools, a ReLU per use) in float64
    with random weights and batch norms that are not the identity."""
    torch.manual_seed(0)
    net = ShapesNet(width=4).double().eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.3, 0.3)
                module.running_var.uniform_(0.5, 2.0)
                module.bias.uniform_(-0.3, 0.3)
    return net


def _images(batch: int = 2, size: int = 16) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64)


def _small(activation: type[nn.Module], second: type[nn.Module] | None = None) -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), activation(),
                         nn.Conv2d(4, 5, 3, padding=1), (second or activation)(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double().eval()


# ---------------------------------------------------------------- the textbook methods


def test_guided_backprop_and_guided_grad_cam_are_their_textbook_formulas_on_a_resnet():
    net, x, target = _shapes_net(), _images(), torch.tensor([3, 1])
    guided = _guided_reference(net, x, target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ev.build_method("guided_backprop", net)(net, x, target)
        torch.testing.assert_close(ours, guided)
        assert ev.method_settings("guided_gradcam", net) == "layer res2.conv2"
        cam = _grad_cam_reference(net, "res2.conv2", x, target)
        torch.testing.assert_close(ev.build_method("guided_gradcam", net)(net, x, target),
                                   guided * cam)
    with torch.no_grad():  # the hooks changed no logit
        assert torch.equal(net(x), _shapes_net()(x))


@pytest.mark.parametrize("name", ["guided_backprop", "guided_gradcam", "gradcam",
                                  "integrated_gradients", "smoothgrad"])
def test_an_image_alone_gets_its_row_of_the_batch(name):
    net, x, target = _shapes_net(), _images(), torch.tensor([3, 1])
    explain = ev.build_method(name, net, ig_steps=4, smoothgrad_samples=2, batch_size=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = explain(net, x, target)
        alone = torch.cat([explain(net, x[i:i + 1], target[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(both, alone)


# ---------------------------------------------------------------- what guided backprop guides


@pytest.mark.parametrize("activation", [nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.ELU])
def test_guided_backprop_refuses_a_network_it_would_leave_as_its_gradient(activation):
    # Captum guides nn.ReLU modules only: on these networks "guided backprop" returned the
    # plain gradient bit for bit, and guided Grad-CAM the gradient times Grad-CAM, under
    # their names (the explorer's Compare panel, evaluate's rows).
    net, x, target = _small(activation), _images(size=6), torch.tensor([0, 2])
    for name in ("guided_backprop", "guided_gradcam"):
        with pytest.raises(PullbackWidgetsError, match=activation.__name__):
            ev.build_method(name, net)
        # ... and an explainer built on a ReLU network, called on this one.
        relu_built = ev.build_method(name, _small(nn.ReLU))
        with pytest.raises(PullbackWidgetsError, match="guided backprop"):
            relu_built(net, x, target)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # The registry leaves them out, as it leaves Grad-CAM out of a network without a conv.
    methods = ev.method_registry(net, temperatures=(), captum=True)
    assert "guided_backprop" not in methods and "guided_gradcam" not in methods
    assert {"gradcam", "integrated_gradients", "guided_backprop_captum"} <= set(methods)


def test_guided_backprop_refuses_a_network_only_partly_guided():
    # MobileNetV3's mix: ReLU modules are guided, Hardswish ones passed their plain gradient.
    net = _small(nn.ReLU, nn.Hardswish)
    with pytest.raises(PullbackWidgetsError, match=r"Hardswish \('3'\)"):
        ev.build_method("guided_backprop", net)
    for activation in (nn.ReLU, nn.ReLU6):  # what it does guide is still run
        net, x, target = _small(activation), _images(size=6), torch.tensor([0, 2])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(ev.build_method("guided_backprop", net)(net, x, target),
                                       _guided_reference(net, x, target))


class _OwnGELU(nn.Module):
    """An activation of the model's own class (as timm's GELU is): no torch type to name."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.gelu(z)


def test_guided_backprop_refuses_a_network_without_a_relu_module():
    for net in (_small(_OwnGELU), nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(),
                                                nn.LazyLinear(3)).double()):
        with pytest.raises(PullbackWidgetsError, match="has none: its map would be the plain"):
            ev.build_method("guided_backprop", net)


class _PreActivationReused(nn.Module):
    """A pre-activation that also feeds another path than its ReLU (h = ReLU(z) - 0.7 z)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv1(x)
        return self.fc(self.conv2(self.relu(z) - 0.7 * z).mean((2, 3)))


def test_guided_backprop_guides_the_relu_path_only_where_its_input_has_others():
    # Captum hooks the ReLU's input tensor: the gradient of every path through it was
    # clamped, the plain -0.7 path's too (the map was 30 % off in its largest value).
    net, x, target = _PreActivationReused().double().eval(), _images(size=5), torch.tensor([1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(ev.build_method("guided_backprop", net)(net, x, target),
                                   _guided_reference(net, x, target))


class _AuxiliaryHead(nn.Module):
    """A classifier whose last registered Conv2d is an auxiliary head that runs in training
    only, as GoogLeNet's."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(4, 3)
        self.aux = nn.Sequential(nn.Conv2d(4, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(2, 3))

    def forward(self, x):
        h = self.features(x)
        logits = self.fc(h.mean((2, 3)))
        return logits + self.aux(h) if self.training else logits


@pytest.mark.parametrize("name", ["gradcam", "guided_gradcam"])
def test_a_cam_layer_that_never_runs_is_a_one_line_error(name):
    # Captum's bare AssertionError ("Forward hook did not obtain any outputs ...").
    torch.manual_seed(0)
    model = _AuxiliaryHead().double().eval()
    x = torch.rand(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(PullbackWidgetsError, match=r"'aux\.0' does not run in the model's"):
        ev.build_method(name, model)(model, x, torch.tensor([1]))
