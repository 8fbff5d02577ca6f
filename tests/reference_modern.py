"""Slow frozen-gate forms of the modern gates, written independently of the package.

Nothing here imports pullback_widgets. Each activation is written as
z·stopgrad(g(z/T)) + stopgrad(act(z) - z·g(z/T)): the model's own value, and the gradient
grad·g(z/T). Each norm keeps its value and gets the gradient of a copy whose statistics are
stopgrad'ed. Attention: stopgrad(A·v) + (stopgrad(A_T)·v - stopgrad(A_T·v)). The reference
network is a deep copy of the model with its modules swapped for these (the paper's way),
never the engine's TorchFunctionMode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEFAULTS = {"relu": 0.3, "pool": 0.3, "silu": 1.6, "gelu": 1.0, "hardswish": 1.0,
            "attention": 1.0}


def kind_temperature(temperature: float | Mapping[str, float], kind: str) -> float:
    if isinstance(temperature, Mapping):
        return temperature.get(kind, DEFAULTS[kind])
    return temperature


def sigmoid(u: Tensor) -> Tensor:
    return 1.0 / (1.0 + torch.exp(-u))


def normal_cdf(u: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(u / math.sqrt(2.0)))


def tanh_normal_cdf(u: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))


def hardswish_gate(u: Tensor) -> Tensor:
    return torch.clamp((u + 3.0) / 6.0, 0.0, 1.0)


RELU_GATES = {"sigmoid": sigmoid, "normal_cdf": normal_cdf}


def frozen(z: Tensor, value: Tensor, gate: Tensor) -> Tensor:
    """``value`` in value; gradient gate·grad: z·sg(gate) + sg(value - z·gate)."""
    return z * gate.detach() + (value - z * gate).detach()


def frozen_silu(z: Tensor, temperature: float) -> Tensor:
    return frozen(z, F.silu(z), sigmoid(z / temperature))


def frozen_gelu(z: Tensor, temperature: float, approximate: str = "none") -> Tensor:
    gate = tanh_normal_cdf if approximate == "tanh" else normal_cdf
    return frozen(z, F.gelu(z, approximate=approximate), gate(z / temperature))


def frozen_hardswish(z: Tensor, temperature: float) -> Tensor:
    return frozen(z, F.hardswish(z), hardswish_gate(z / temperature))


def frozen_leaky(z: Tensor, slope: float | Tensor, temperature: float, gate: str) -> Tensor:
    """LeakyReLU (float slope) or PReLU (slope (C,) over dim 1): gate a + (1 - a)·g(z/T)."""
    if isinstance(slope, Tensor):
        slope_b = slope.view(-1, *([1] * (z.dim() - 2))) if slope.numel() > 1 else slope
        value = torch.where(z > 0, z, slope_b * z)
    else:
        slope_b, value = slope, F.leaky_relu(z, slope)
    return frozen(z, value, slope_b + (1 - slope_b) * RELU_GATES[gate](z / temperature))


def frozen_layer_norm(x: Tensor, shape: tuple[int, ...], weight: Tensor | None,
                      bias: Tensor | None, eps: float) -> Tensor:
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    mean = x.mean(dims, keepdim=True).detach()
    var = ((x - mean) ** 2).mean(dims, keepdim=True).detach()
    soft = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        soft = soft * weight
    if bias is not None:
        soft = soft + bias
    value = F.layer_norm(x, shape, weight, bias, eps)
    return value.detach() + soft - soft.detach()


def frozen_group_norm(x: Tensor, groups: int, weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> Tensor:
    n, c = x.shape[:2]
    grouped = x.reshape(n, groups, -1)
    mean = grouped.mean(2, keepdim=True).detach()
    var = ((grouped - mean) ** 2).mean(2, keepdim=True).detach()
    soft = ((grouped - mean) / torch.sqrt(var + eps)).view_as(x)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        soft = soft * weight.view(shape)
    if bias is not None:
        soft = soft + bias.view(shape)
    value = F.group_norm(x, groups, weight, bias, eps)
    return value.detach() + soft - soft.detach()


def reference_attention(q: Tensor, k: Tensor, v: Tensor, temperature: float,
                        rule: str = "detached", mask: Tensor | None = None,
                        is_causal: bool = False) -> Tensor:
    """The model's attention in value; gradient through softened weights A_T.

    detached:       sg(A·v) + sg(A_T)·v - sg(A_T·v)
    differentiated: sg(A·v) + A_T·v - sg(A_T·v), A_T = softmax(S + sg(S/T - S) + mask): the
                    value of S/T, the gradient of S (1/T passed straight through).
    ``mask`` as scaled_dot_product_attention takes it: bool (True takes part) or additive.
    """
    value = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
    scores = torch.einsum("...le,...se->...ls", q, k) / math.sqrt(q.shape[-1])
    logits = scores / temperature if rule == "detached" \
        else scores + (scores / temperature - scores).detach()
    allowed = torch.ones(logits.shape[-2:], dtype=torch.bool)
    if is_causal:
        allowed = torch.tril(allowed)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        logits = logits + mask
    logits = torch.where(allowed, logits, torch.tensor(-math.inf, dtype=logits.dtype))
    weights = torch.softmax(logits, dim=-1)
    if rule == "detached":
        weights = weights.detach()
    soft = torch.einsum("...ls,...se->...le", weights, v)
    return value.detach() + soft - soft.detach()


class _ReferenceTimmAttention(nn.Module):
    """timm's Attention (fused or not) with :func:`reference_attention`."""

    def __init__(self, attention: nn.Module, temperature: float, rule: str) -> None:
        super().__init__()
        self.attention, self.temperature, self.rule = attention, temperature, rule

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        m = self.attention
        b, n, _ = x.shape
        q, k, v = m.qkv(x).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
        q, k = m.q_norm(q), m.k_norm(k)
        x = reference_attention(q, k, v, self.temperature, self.rule, attn_mask, is_causal)
        return m.proj(m.norm(x.transpose(1, 2).reshape(b, n, -1)))


class _ReferenceMultiheadAttention(nn.Module):
    """nn.MultiheadAttention (batch_first, self-attention, packed in-projection) by hand."""

    def __init__(self, attention: nn.MultiheadAttention, temperature: float, rule: str) -> None:
        super().__init__()
        self.attention, self.temperature, self.rule = attention, temperature, rule

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None):
        m = self.attention
        assert m.batch_first and query is key is value and m.bias_k is None
        b, n, e = query.shape
        heads = m.num_heads
        q, k, v = (t.view(b, n, heads, e // heads).transpose(1, 2) for t in
                   F.linear(query, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1))
        # nn.MultiheadAttention's masks: True (or -inf) means "leave out"; summed into one.
        additive = torch.zeros(b, 1, n, n, dtype=query.dtype)
        if attn_mask is not None:
            additive = additive + (torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(
                attn_mask, -math.inf) if attn_mask.dtype == torch.bool else attn_mask)
        if key_padding_mask is not None:
            additive = additive.masked_fill(key_padding_mask.view(b, 1, 1, n), -math.inf)
        x = reference_attention(q, k, v, self.temperature, self.rule, additive)
        return m.out_proj(x.transpose(1, 2).reshape(b, n, e)), None


# ---------------------------------------------------------------- module swaps

class _Frozen(nn.Module):
    def __init__(self, fn: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _swap(module: nn.Module, temperature, gate: str, rule: str) -> nn.Module | None:
    """The frozen-gate replacement of one module, or None to keep it."""
    name = type(module).__name__
    t = {kind: kind_temperature(temperature, kind) for kind in DEFAULTS}
    if name == "Attention" and hasattr(module, "qkv"):  # timm
        return _ReferenceTimmAttention(module, t["attention"], rule)
    if isinstance(module, nn.MultiheadAttention):
        return _ReferenceMultiheadAttention(module, t["attention"], rule)
    # timm has its own activation classes (timm.layers.activations), not nn subclasses.
    if isinstance(module, nn.SiLU) or name in ("Swish", "SiLU"):
        return _Frozen(lambda z: frozen_silu(z, t["silu"]))
    if isinstance(module, nn.GELU) or name in ("GELU", "GELUTanh"):
        approximate = "tanh" if name == "GELUTanh" else getattr(module, "approximate", "none")
        return _Frozen(lambda z: frozen_gelu(z, t["gelu"], approximate))
    if isinstance(module, nn.Hardswish) or name == "HardSwish":
        return _Frozen(lambda z: frozen_hardswish(z, t["hardswish"]))
    if isinstance(module, nn.LeakyReLU):
        return _Frozen(lambda z: frozen_leaky(z, module.negative_slope, t["relu"], gate))
    if isinstance(module, nn.PReLU):
        return _Frozen(lambda z: frozen_leaky(z, module.weight, t["relu"], gate))
    if name == "LayerNorm2d":  # timm: layer_norm over channels of (N, C, H, W)
        return _Frozen(lambda x: frozen_layer_norm(
            x.permute(0, 2, 3, 1), tuple(module.normalized_shape), module.weight, module.bias,
            module.eps).permute(0, 3, 1, 2))
    if isinstance(module, nn.LayerNorm):
        return _Frozen(lambda x: frozen_layer_norm(
            x, tuple(module.normalized_shape), module.weight, module.bias, module.eps))
    if isinstance(module, nn.GroupNorm):
        return _Frozen(lambda x: frozen_group_norm(
            x, module.num_groups, module.weight, module.bias, module.eps))
    return None


def frozen_copy(model: nn.Module, temperature: float | Mapping[str, float],
                gate: str = "sigmoid", attention_weights: str = "detached") -> nn.Module:
    """A deep copy of ``model`` (eval mode) with every modern gate module swapped."""
    reference = copy.deepcopy(model).eval()
    for parent in list(reference.modules()):
        for child_name, child in list(parent.named_children()):
            replacement = _swap(child, temperature, gate, attention_weights)
            if replacement is not None:
                setattr(parent, child_name, replacement)
    return reference


def input_gradient(model: nn.Module, x: Tensor, target: int) -> Tensor:
    x = x.detach().clone().requires_grad_()
    (grad,) = torch.autograd.grad(model(x)[:, target].sum(), x)
    return grad


def cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def assert_matches(actual: Tensor, expected: Tensor, relative_error: float) -> None:
    """cos >= 0.99999 (the issues' bar), and a relative L2 error below ``relative_error``:
    the cosine alone barely sees a 10% change of T (1 - cos ~ 1e-5 on a ViT)."""
    assert expected.abs().max() > 0, "the reference gradient is zero: the test would be void"
    error = float((actual - expected).norm() / expected.norm())
    assert cosine(actual, expected) >= 0.99999 and error <= relative_error, \
        (cosine(actual, expected), error)
