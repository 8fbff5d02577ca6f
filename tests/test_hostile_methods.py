"""A hostile review of the attribution adapters (evaluation/methods.py) and the ground truth's
Grad-CAM: each method against a slow written-out version, targets paired with their images,
the model left as found, and bad calls told as the package's own errors."""

from __future__ import annotations

import copy
import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from pullback_widgets.evaluation import ground_truth as gt
from pullback_widgets.evaluation import methods as ev
from pullback_widgets.validation import PullbackWidgetsError, PullbackWidgetsTypeError


class _Net(nn.Module):
    """conv-BN-ReLU(in place)-conv-ReLU-dropout-mean-linear, 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu2(self.conv2(self.relu1(self.bn(self.conv1(x)))))
        return self.fc(self.drop(h.mean((2, 3))))


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = _Net().double()
    with torch.no_grad():  # running statistics that are not the identity
        net.bn.running_mean.uniform_(-0.2, 0.2)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


def _images(batch: int = 3, height: int = 8, width: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed),
                      dtype=torch.float64)


def _gradient(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Autograd by hand, one image at a time: each with its own class."""
    out = []
    for image, cls in zip(x, target.tolist()):
        image = image[None].detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(net(image)[0, cls], image)
        out.append(grad)
    return torch.cat(out)


# ---------------------------------------------------------------- the textbook methods


def test_integrated_gradients_is_the_gauss_legendre_sum_of_each_images_own_class():
    pytest.importorskip("captum.attr")
    net, x = _net(), _images()
    target = torch.tensor([2, 0, 1])
    nodes, weights = np.polynomial.legendre.leggauss(6)
    expected = sum(float(w) / 2 * _gradient(net, float(a + 1) / 2 * x, target)
                   for a, w in zip(nodes, weights)) * x
    # batch_size 2 < 3 images: Captum splits the steps, the classes must follow their images.
    for batch_size in (2, 16):
        ours = ev.build_method("integrated_gradients", net, ig_steps=6,
                               batch_size=batch_size)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.testing.assert_close(ours(net, x, target), expected)
    # ... and with many steps it is the Riemann integral, whose sum is the logit difference.
    many = ev.build_method("integrated_gradients", net, ig_steps=64)(net, x, target)
    with torch.no_grad():
        rows = torch.arange(3)
        difference = net(x)[rows, target] - net(torch.zeros_like(x))[rows, target]
    torch.testing.assert_close(many.flatten(1).sum(1), difference, rtol=2e-2, atol=1e-3)


def test_smoothgrad_is_the_mean_gradient_under_the_documented_pixel_noise():
    pytest.importorskip("captum.attr")
    net, x = _net(), _images()
    target = torch.tensor([1, 2, 0])
    samples, std = 5, 0.2
    ours = ev.build_method("smoothgrad", net, smoothgrad_samples=samples,
                           smoothgrad_std=std)(net, x, target)
    expected = []
    for index in range(3):
        # The adapter's documented draw: seed 0 and the image's pixels, N(0, std²) per pixel.
        torch.manual_seed(ev._content_seed(x[index]) % 2 ** 63)
        noise = torch.normal(0.0, torch.full((samples, *x.shape[1:]), std))
        noisy = x[index:index + 1] + noise
        expected.append(_gradient(net, noisy, target[index].repeat(samples)).mean(0))
    torch.testing.assert_close(ours, torch.stack(expected))
    # The same image gets the same noise in another batch; two images do not share theirs.
    torch.testing.assert_close(ev.build_method("smoothgrad", net, smoothgrad_samples=samples,
                                               smoothgrad_std=std)(net, x[1:2], target[1:2]),
                               ours[1:2])


def test_grad_cam_keeps_the_orientation_of_a_wide_image():
    pytest.importorskip("captum.attr")
    net, x = _net(), _images(batch=2, height=6, width=11)
    target = torch.tensor([0, 2])
    taken = {}
    handle = net.conv2.register_forward_hook(lambda m, a, out: taken.setdefault("a", out))
    try:
        logits = net(x)
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(logits[torch.arange(2), target].sum(), taken["a"])
    cam = F.relu((grad.mean((2, 3), keepdim=True) * taken["a"]).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=(6, 11), mode="bilinear", align_corners=False).detach()
    for explain in (ev.build_method("gradcam", net), gt.grad_cam("conv2")):
        cam_map = explain(net, x, target)
        assert cam_map.shape == x.shape
        torch.testing.assert_close(cam_map.sum(1, keepdim=True), expected)


def test_every_method_leaves_a_train_mode_model_as_found():
    net = _net().train()
    state = copy.deepcopy(net.state_dict())
    x, target = _images(batch=2), torch.tensor([0, 2])
    names = [n for n in ev.METHODS if n not in ev.CAPTUM_METHODS or ev.captum_available()]
    for name in names:
        explain = ev.build_method(name, net, ig_steps=2, smoothgrad_samples=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            first, second = explain(net, x, target), explain(net, x, target)
        assert torch.equal(first, second), name  # Dropout stayed off, the noise is seeded
        assert all(m.training for m in net.modules()), name
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in state.items()), name
        assert all(p.grad is None for p in net.parameters()), name
        assert not any(m._forward_hooks or m._backward_hooks for m in net.modules()), name


# ---------------------------------------------------------------- targets and their images


def test_one_class_for_a_batch_is_refused_as_the_pullback_refuses_it():
    # It was read as the first image's class only: gradient gave the other images an
    # all-zero map (as did the ground truth's Grad-CAM), while Captum's methods read it as
    # every image's class, and the pullback refuses it.
    net, x = _net(), _images()
    explainers = [ev.gradient, ev.gradient_times_input, ev.random_attribution,
                  gt.grad_cam("conv2")]
    if ev.captum_available():
        explainers += [ev.build_method(n, net, ig_steps=2, smoothgrad_samples=2)
                       for n in ev.CAPTUM_METHODS]
    for explain in explainers:
        with pytest.raises(PullbackWidgetsError, match="1 classes for a batch of 3"):
            explain(net, x, torch.tensor([2]))
    with pytest.raises(PullbackWidgetsError, match="1 classes for a batch of 3"):
        pw.excitation_pullback(net, x, torch.tensor([2]))
    # One int is every image's class, as for the pullback.
    torch.testing.assert_close(ev.gradient(net, x, 2),
                               ev.gradient(net, x, torch.tensor([2, 2, 2])))
    torch.testing.assert_close(ev.gradient(net, x, [2, 0, 1]),
                               _gradient(net, x, torch.tensor([2, 0, 1])))


@pytest.mark.parametrize("name", ["gradient", "smoothgrad", "integrated_gradients", "gradcam",
                                  "guided_backprop", "guided_gradcam"])
def test_classes_outside_the_model_are_clear_errors(name):
    if name in ev.CAPTUM_METHODS:
        pytest.importorskip("captum.attr")
    net, x = _net(), _images()
    explain = ev.build_method(name, net, ig_steps=2, smoothgrad_samples=2)
    # SmoothGrad read -1 as the last class without a word.
    with pytest.raises(PullbackWidgetsError, match="class -1 is negative"):
        explain(net, x, torch.tensor([0, -1, 1]))
    with pytest.raises(PullbackWidgetsError, match=r"class 3 is out of range \[0, 3\)"):
        explain(net, x, torch.tensor([0, 3, 1]))
    assert not any(m._forward_hooks for m in net.modules())


def test_the_ground_truth_grad_cam_refuses_a_class_outside_the_model():
    net, x = _net(), _images()
    with pytest.raises(PullbackWidgetsError, match=r"class 5 is out of range \[0, 3\)"):
        gt.grad_cam("conv2")(net, x, torch.tensor([0, 5, 1]))


def test_bad_targets_and_images_are_the_packages_errors():
    net, x = _net(), _images()
    explainers = [ev.gradient, ev.random_attribution, gt.grad_cam("conv2")]
    if ev.captum_available():
        explainers += [ev.build_method("smoothgrad", net, smoothgrad_samples=2),
                       ev.build_method("gradcam", net)]
    for explain in explainers:
        with pytest.raises(PullbackWidgetsTypeError, match="integer class indices"):
            explain(net, x, torch.tensor([0.0, 1.0, 2.0]))
        with pytest.raises(PullbackWidgetsTypeError, match="explain classes"):
            explain(net, x, pw.Unit("conv2", 0))
        with pytest.raises(PullbackWidgetsTypeError, match=r"torch\.Tensor"):
            explain(net, x.numpy(), torch.tensor([0, 1, 2]))
        with pytest.raises(PullbackWidgetsError, match=r"\(B, C, H, W\)"):
            explain(net, x[0], torch.tensor([0, 1, 2]))


# ---------------------------------------------------------------- dtypes, layers, settings


def test_random_and_smoothgrad_run_on_bfloat16():
    # numpy has no bfloat16: the content seed failed with a TypeError; SmoothGrad's float32
    # noise then took the model float32 images.
    net = _net().to(torch.bfloat16)
    x = _images(batch=2).to(torch.bfloat16)
    target = torch.tensor([0, 1])
    noise = ev.random_attribution(net, x, target)
    assert noise.dtype == torch.bfloat16 and noise.shape == x.shape
    assert torch.equal(noise, ev.random_attribution(net, x, target))
    assert not torch.equal(noise[0], noise[1])
    # The seeds of the other dtypes are those of before: the hash of numpy's bytes.
    for image in (_images(batch=1)[0], _images(batch=1)[0].float().transpose(1, 2)):
        digest = hashlib.blake2b(image.numpy().tobytes(), digest_size=8).digest()
        assert ev._content_seed(image) == int.from_bytes(digest, "little")
    if ev.captum_available():
        smooth = ev.build_method("smoothgrad", net, smoothgrad_samples=2)(net, x, target)
        assert smooth.dtype == torch.bfloat16 and torch.isfinite(smooth.float()).all()


def test_grad_cam_at_a_layer_without_a_feature_map_is_a_clear_error():
    pytest.importorskip("captum.attr")
    net, x, target = _net(), _images(), torch.tensor([0, 1, 2])
    # Captum's guided Grad-CAM warned and returned an empty tensor (0,) as the map.
    for name in ("gradcam", "guided_gradcam"):
        with pytest.raises(PullbackWidgetsError, match=r"output \(B, C, H, W\)"):
            ev.build_method(name, net, cam_layer="fc")(net, x, target)


def test_a_model_without_a_conv_gets_every_other_method():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).double()
    # With Captum installed, the registry failed with a ValueError on any model without one.
    methods = ev.method_registry(mlp, temperatures=(0.3,), captum=ev.captum_available())
    assert "gradcam" not in methods and "guided_gradcam" not in methods
    assert {"gradient", "random", "pullback sigmoid T=0.3"} <= set(methods)
    if ev.captum_available():
        assert "integrated_gradients" in methods
        with pytest.raises(PullbackWidgetsError, match="need a Conv2d layer"):
            ev.build_method("gradcam", mlp)
    with pytest.raises(PullbackWidgetsError, match="need a Conv2d layer"):
        ev.method_settings("gradcam", mlp)
    with pytest.raises(PullbackWidgetsTypeError, match="cam_layer must be a module's name"):
        ev.build_method("gradcam", _net(), cam_layer=["conv2"])


def test_method_settings_refuses_what_build_method_refuses():
    net = _net()
    with pytest.raises(PullbackWidgetsError, match="ig_steps must be >= 1"):
        ev.method_settings("integrated_gradients", net, ig_steps=0)
    with pytest.raises(PullbackWidgetsError, match="smoothgrad_std"):
        ev.method_settings("smoothgrad", net, smoothgrad_std=-0.1)
    with pytest.raises(PullbackWidgetsError, match="method must be one of"):
        ev.method_settings("gradcm", net)
    with pytest.raises(PullbackWidgetsTypeError, match="non-empty list"):
        ev.check_methods(5)
    assert ev.method_settings("gradcam", net) == "layer conv2"
    assert ev.method_settings("smoothgrad", net, smoothgrad_std=0.2) == \
        "8 samples, noise σ = 0.2"
