"""Attention as a gate (timm ViTs, torchvision VisionTransformer, nn.MultiheadAttention),
against the slow references of tests/reference_modern.py."""

import math
import warnings

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pullback_widgets as pw
from pullback_widgets.graph_audit import audit_graph
from pullback_widgets.targets import TokenGrid
from tests import reference_modern as ref

TEMPERATURES = (0.5, 1.0, 2.0)


def timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, depth=2,
                             num_classes=10, **kwargs).eval().double()


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=64, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
        num_classes=10).eval().double()
    nn.init.normal_(model.heads.head.weight, std=0.2)  # torchvision zeroes the head
    return model


class MaskedViT(nn.Module):
    """A timm ViT called with an attention mask over its 17 tokens."""

    def __init__(self, vit: nn.Module, mask: torch.Tensor | None, is_causal: bool = False):
        super().__init__()
        self.vit, self.mask, self.is_causal = vit, mask, is_causal

    def forward(self, x):
        return self.vit(x, attn_mask=self.mask, is_causal=self.is_causal)


def token_masks():
    generator = torch.Generator().manual_seed(5)
    keep = torch.rand(2, 1, 17, 17, generator=generator) > 0.4
    keep[..., 0] = True  # every query keeps the class token: no row left empty
    bias = torch.randn(2, 1, 17, 17, generator=generator, dtype=torch.float64)
    bias = bias.masked_fill(~keep, float("-inf"))
    return {"bool": (keep, False), "additive": (bias, False), "causal": (None, True)}


@pytest.fixture(scope="module")
def inputs():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1),
                      dtype=torch.float64)


@pytest.mark.parametrize("rule", ["detached", "differentiated"])
def test_timm_vit_matches_the_reference(inputs, rule):
    model = timm_vit()
    session = pw.PullbackSession(model, inputs, attention_weights=rule)
    assert session.gated_kinds == {"attention": 2, "gelu": 2, "norm": 5}
    for temperature in (*TEMPERATURES, {"attention": 0.3, "gelu": 1.7}):
        actual = session.pullback(4, temperature=temperature)
        expected = ref.input_gradient(ref.frozen_copy(model, temperature, "sigmoid", rule),
                                      inputs, 4)
        ref.assert_matches(actual, expected, relative_error=1e-10)  # T * 1.01: 2e-3


@pytest.mark.parametrize("mask_name", ["bool", "additive", "causal"])
@pytest.mark.parametrize("rule", ["detached", "differentiated"])
def test_timm_vit_with_masks_matches_the_reference(inputs, mask_name, rule):
    mask, is_causal = token_masks()[mask_name]
    model = MaskedViT(timm_vit(global_pool="avg"), mask, is_causal)  # causal: the class
    # token would see only itself
    session = pw.PullbackSession(model, inputs, attention_weights=rule)
    for temperature in TEMPERATURES:
        actual = session.pullback(2, temperature=temperature)
        expected = ref.input_gradient(ref.frozen_copy(model, temperature, "sigmoid", rule),
                                      inputs, 2)
        ref.assert_matches(actual, expected, relative_error=1e-10)  # T * 1.01: 2e-3


@pytest.mark.parametrize("rule", ["detached", "differentiated"])
def test_torchvision_vit_matches_the_reference(inputs, rule):
    model = torchvision_vit()
    session = pw.PullbackSession(model, inputs, attention_weights=rule)
    assert session.gated_kinds == {"attention": 2, "gelu": 2, "norm": 5}
    for temperature in TEMPERATURES:
        actual = session.pullback(7, temperature=temperature)
        expected = ref.input_gradient(ref.frozen_copy(model, temperature, "sigmoid", rule),
                                      inputs, 7)
        ref.assert_matches(actual, expected, relative_error=1e-10)  # T * 1.01: 2e-3


class PaddedAttention(nn.Module):
    """nn.MultiheadAttention over tokens, with a key-padding mask and a boolean attn_mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.padding = torch.tensor([[False] * 5 + [True], [False] * 4 + [True] * 2])
        self.banned = torch.eye(6, dtype=torch.bool).roll(1, dims=1)  # no row fully banned

    def forward(self, tokens):
        out, _ = self.attention(tokens, tokens, tokens, key_padding_mask=self.padding,
                                need_weights=False, attn_mask=self.banned)
        return out.sum((1, 2))


@pytest.mark.parametrize("rule", ["detached", "differentiated"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_multihead_attention_masks_match_the_reference(rule, temperature):
    model = PaddedAttention().double().eval()
    tokens = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    with pw.soft_gating(model, temperature=temperature, attention_weights=rule) as settings:
        (actual,) = torch.autograd.grad(model(tokens).sum(), tokens)
    assert settings.temperature == temperature
    reference = ref.frozen_copy(model, temperature, attention_weights=rule)
    (expected,) = torch.autograd.grad(reference(tokens).sum(), tokens)
    torch.testing.assert_close(actual, expected)


def test_small_temperature_gives_hard_argmax_weights():
    torch.manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    with pw.soft_gating(nn.Identity(), temperature={"attention": 1e-4}):
        grads = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), (q, k, v),
                                    grad_out, allow_unused=True, materialize_grads=True)
    argmax = F.one_hot((q @ k.transpose(-2, -1)).argmax(-1), 5).to(q.dtype)
    torch.testing.assert_close(grads[2], argmax.transpose(-2, -1) @ grad_out)
    assert not grads[0].any() and not grads[1].any()  # detached: nothing through q, k


def test_a_fully_masked_row_gets_no_weight():
    q, k, v = (torch.randn(1, 1, 3, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    keep = torch.ones(3, 3, dtype=torch.bool)
    keep[1] = False
    grad_out = torch.zeros(1, 1, 3, 4, dtype=torch.float64)
    grad_out[..., 1, :] = 1.0  # only the empty row's output is pulled back
    with pw.soft_gating(nn.Identity(), attention_weights="differentiated"):
        grads = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                                    (q, k, v), grad_out)
    for grad in grads:
        assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("make", [timm_vit, torchvision_vit])
@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
def test_forward_and_hard_gate_are_the_model_own_bit_for_bit(inputs, make, backend):
    model, inputs = make().float(), inputs.float()  # the CPU flash kernel: float32
    with sdpa_kernel(backend):
        leaf = inputs.clone().requires_grad_()
        logits = model(leaf)
        (plain,) = torch.autograd.grad(logits[:, 3].sum(), leaf)
        session = pw.PullbackSession(model, inputs, gate="hard")
        assert torch.equal(session.logits, logits)
        assert torch.equal(session.pullback(3), plain)
        for rule in ("detached", "differentiated"):
            assert not torch.equal(session.pullback(3, gate="sigmoid",
                                                    attention_weights=rule), plain)


@pytest.mark.parametrize("make", [timm_vit, torchvision_vit])
def test_batched_targets_and_ascent_run_on_vits(inputs, make):
    model = make()
    session = pw.PullbackSession(model, inputs, attention_weights="differentiated")
    batched = session.pullbacks([1, 2, 3], batched=True)
    torch.testing.assert_close(batched, session.pullbacks([1, 2, 3], batched=False))
    result = pw.pullback_ascent(model, inputs[:1], 5, steps=2, progress=False)
    assert len(result.images) == 3 and torch.isfinite(result.images[-1]).all()


def test_attention_computed_by_hand_is_said_to_stay_plain(inputs):
    model = timm_vit()
    for block in model.blocks:
        block.attn.fused_attn = False
    with pytest.warns(UserWarning, match="attention there stays plain"):
        session = pw.PullbackSession(model, inputs)
    assert session.plain_attention == 2 and "attention" not in session.gated_kinds


def test_multihead_attention_with_weights_is_said_to_stay_plain():
    model = PaddedAttention().double().eval()
    model.forward = lambda t: model.attention(t, t, t)[0].sum((1, 2))  # need_weights=True
    tokens = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    with pw.soft_gating(model) as settings:
        from pullback_widgets.interception import _active_gating_mode
        out = model(tokens)
        mode = _active_gating_mode()
        audit = audit_graph([out], tokens, mode.gated_nodes)
        assert audit.softmaxes == 1 and audit.gated_kinds == {} and not mode.gated_nodes
    assert settings.attention_weights == "detached"


def test_unsupported_attention_is_refused():
    q = torch.randn(1, 4, 3, 8, requires_grad=True)
    kv = torch.randn(1, 2, 3, 8, requires_grad=True)
    with pw.soft_gating(nn.Identity()):
        # Reached in eval mode only by a model that passes dropout_p even then: the message
        # once said "put the model in eval mode", which it already was.
        with pytest.raises(pw.PullbackWidgetsError, match=r"dropout.*0\.0 outside training"):
            F.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
        with pytest.raises(pw.PullbackWidgetsError, match="enable_gqa"):
            F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    with pytest.raises(pw.PullbackWidgetsError, match="did you mean 'differentiated'"):
        pw.PullbackSession(timm_vit(), torch.rand(1, 3, 64, 64, dtype=torch.float64),
                           attention_weights="diferentiated")


def test_train_mode_vit_runs_in_eval_without_dropout(inputs):
    model = timm_vit(attn_drop_rate=0.3).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pw.PullbackSession(model, inputs).pullback(1)
    assert model.training


@pytest.mark.parametrize("temperature", [1e-30, 1e-300])
def test_tiny_temperatures_give_the_argmax_among_allowed_keys(temperature):
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, 2, 6, 4, requires_grad=True) for _ in range(3))
    keep = torch.rand(6, 6, generator=torch.Generator().manual_seed(7)) > 0.5
    keep[:, 0] = True
    additive = torch.zeros(6, 6).masked_fill(~keep, float("-inf"))
    grad_out = torch.randn(2, 2, 6, 4)
    scores = q @ k.transpose(-2, -1)
    for kwargs, allowed in (({"attn_mask": keep}, keep), ({"attn_mask": additive}, keep),
                            ({"is_causal": True}, torch.ones(6, 6, dtype=torch.bool).tril())):
        with pw.soft_gating(nn.Identity(), temperature={"attention": temperature}):
            (grad_v,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, **kwargs),
                                            v, grad_out)
        winners = scores.masked_fill(~allowed, float("-inf")).argmax(-1)
        hard = F.one_hot(winners, 6).to(v.dtype)
        torch.testing.assert_close(grad_v, hard.transpose(-2, -1) @ grad_out)


@pytest.mark.parametrize(("make", "layer"), [(timm_vit, "blocks.1"),
                                             (torchvision_vit, "encoder.layers.encoder_layer_1")])
def test_a_unit_on_a_token_map_addresses_a_patch(inputs, make, layer):
    model = make()
    session = pw.PullbackSession(model, inputs, gate="hard", layers=[layer])
    assert session.token_grid == TokenGrid(1, 4, 4)  # 64 px, patches of 16, a class token
    leaf = inputs.clone().requires_grad_()
    tokens = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda module, args, out: tokens.setdefault("out", out))
    try:
        model(leaf)
    finally:
        handle.remove()
    out = tokens["out"]  # (B, 17, C)
    (patch,) = torch.autograd.grad(out[:, 1 + 2 * 4 + 3, 5].sum(), leaf, retain_graph=True)
    assert torch.equal(session.pullback(pw.Unit(layer, 5, y=2, x=3)), patch)
    (mean,) = torch.autograd.grad(out[:, 1:, 5].mean(1).sum(), leaf)
    torch.testing.assert_close(session.pullback(pw.Unit(layer, 5)), mean)
    with pytest.raises(pw.PullbackWidgetsError, match=r"outside .* 4x4 patch grid"):
        session.pullback(pw.Unit(layer, 5, y=4, x=0))
    result = pw.pullback_ascent(model, inputs[:1], pw.Unit(layer, 5, y=2, x=3), steps=1,
                                progress=False)
    torch.testing.assert_close(result.logits[0], out[:1, 1 + 2 * 4 + 3, 5].detach())


@pytest.mark.parametrize(("make", "block", "channels"), [
    (timm_vit, "blocks.1", 192), (torchvision_vit, "encoder.layers.encoder_layer_1", 32)])
def test_feature_layers_offer_the_blocks_token_maps(inputs, make, block, channels):
    layers = pw.model_helpers.feature_layers(make(), inputs[:1])
    assert layers[block] == (channels, 4, 4)  # (C, patch rows, patch columns)


def test_every_layer_of_a_vit_leaves_out_per_head_tensors(inputs):
    # q_norm and k_norm output (B, heads, N, head dim): offered as maps, heads read as channels.
    layers = pw.model_helpers.feature_layers(timm_vit(qk_norm=True), inputs[:1], every=True)
    assert "blocks.0.attn.q_norm" not in layers and "blocks.0.attn.k_norm" not in layers
    assert layers["patch_embed.proj"] == (192, 4, 4) and layers["blocks.0"] == (192, 4, 4)


@pytest.mark.parametrize(("make", "block", "channels"), [
    (timm_vit, "blocks.1", 192), (torchvision_vit, "encoder.layers.encoder_layer_1", 32)])
def test_the_explorer_pulls_back_a_vit_block_channel(make, block, channels):
    from pullback_widgets.model_helpers import scaled_temperatures
    from tests.test_widgets import _expected_relative, _heatmap_z

    model = make().float()
    model.input_size = 64
    explorer = pw.PullbackExplorer(model, "coffee", labels=[f"c{i}" for i in range(10)],
                                   temperature=0.5)
    try:
        explorer.wait()
        assert explorer.layer_shapes[block] == (channels, 4, 4)
        assert "attention" in explorer._session.gated_kinds
        explorer.layer.value = block
        explorer.channel.value = 3
        explorer.wait()
        # The slider is the ReLU family's T; GELU and attention move by the same factor.
        expected = _expected_relative(model, explorer._images["coffee"], pw.Unit(block, 3),
                                      temperature=scaled_temperatures(model, 0.5))
        np.testing.assert_allclose(_heatmap_z(explorer.pullback_figure), expected,
                                   rtol=1e-5, atol=1e-6)
        assert "attention" in explorer.status.value
    finally:
        explorer.close()


@pytest.mark.parametrize(("make", "block"), [
    (timm_vit, "blocks.0"), (torchvision_vit, "encoder.layers.encoder_layer_0")])
def test_the_ascent_explorer_ascends_a_vit_hidden_unit(make, block):
    from pullback_widgets.model_helpers import scaled_temperatures

    model = make().float()
    model.input_size = 64
    explorer = pw.AscentExplorer(model, "coffee", labels=[f"c{i}" for i in range(10)])
    try:
        explorer.wait()
        explorer.layer.value = block
        explorer.channel.value = 2
        explorer.steps.value = 2
        explorer.run_button.click()
        assert explorer.wait()
        start = explorer.result.images[0]
        expected = pw.pullback_ascent(model, start, pw.Unit(block, 2), steps=2,
                                      step_size=explorer.step_size.value,
                                      eps=explorer.eps.value, progress=False,
                                      temperature=scaled_temperatures(
                                          model, explorer.temperature.value))
        torch.testing.assert_close(explorer.result.images[-1], expected.images[-1])
        torch.testing.assert_close(explorer.result.logits, expected.logits)
    finally:
        explorer.close()


def test_the_evaluation_runner_scores_a_vit(tmp_path, inputs):
    from pullback_widgets.evaluation import EvaluationSettings, evaluate, read_rows

    model = timm_vit().float()
    model.labels = [f"c{i}" for i in range(10)]
    settings = EvaluationSettings(model="timm vit", methods=("gradient", "pullback"),
                                  metrics=("deletion", "insertion"), image_size=64, steps=4,
                                  batch_size=2)
    items = [(f"image{i}", image) for i, image in enumerate(inputs.float())]
    evaluate(items, settings, tmp_path / "vit.csv", model=model, progress=False)
    rows = read_rows(tmp_path / "vit.csv")
    assert len(rows) == 2 * 2 * 2  # images x methods x metrics
    values = {(r[0], r[2], r[3]): r[4] for r in rows}
    assert all(np.isfinite(v) for v in values.values())
    x = inputs[:1].float()
    target = model(x).argmax(dim=1)
    attribution = pw.evaluation.build_method("pullback", model)(model, x, target)
    deletion = pw.evaluation.deletion_auc(model, x, target, attribution, steps=4)
    assert float(deletion) == pytest.approx(values[("image0", "pullback", "deletion")],
                                            rel=1e-4)


def test_attention_with_a_fixed_query_still_gates_the_values():
    torch.manual_seed(8)
    query = torch.randn(1, 2, 3, 4, dtype=torch.float64)  # e.g. a buffer: no gradient
    key, value = (torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
                  for _ in range(2))
    grad_out = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    with pw.soft_gating(nn.Identity(), temperature={"attention": 0.5}):
        (grad_value,) = torch.autograd.grad(
            F.scaled_dot_product_attention(query, key, value), value, grad_out)
    weights = torch.softmax(query @ key.detach().transpose(-2, -1) / (2 * 0.5), dim=-1)
    torch.testing.assert_close(grad_value, weights.transpose(-2, -1) @ grad_out)


def test_relative_temperature_is_in_units_of_each_example_score_spread():
    torch.manual_seed(9)
    q, k, v = (torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    grad_out = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with pw.soft_gating(nn.Identity(), temperature={"attention": 0.7},
                        temperature_mode="relative"):
        (grad_v,) = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v), v, grad_out)
    scores = (q @ k.transpose(-2, -1) / 2).detach()
    spread = scores.flatten(1).std(dim=1).view(2, 1, 1, 1)
    weights = torch.softmax(scores / (0.7 * spread), dim=-1)
    torch.testing.assert_close(grad_v, weights.transpose(-2, -1) @ grad_out)


@pytest.mark.parametrize("masking", ["bool mask", "-inf mask", "causal"])
def test_relative_temperature_takes_the_spread_of_the_allowed_scores_only(masking):
    # The spread counted masked keys too: padding tokens, which the forward never uses,
    # moved the pullback of the real ones by 46 % (a review).
    torch.manual_seed(10)
    q, k, v = (torch.randn(2, 2, 5, 4, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    allowed = torch.ones(5, 5, dtype=torch.bool).tril() if masking == "causal" else \
        torch.tensor([True, True, True, False, False]).expand(5, 5)
    mask = None if masking == "causal" else allowed if masking == "bool mask" else \
        torch.zeros(5, 5, dtype=torch.float64).masked_fill(~allowed, -math.inf)
    grad_out = torch.randn(2, 2, 5, 4, dtype=torch.float64)
    with pw.soft_gating(nn.Identity(), temperature={"attention": 0.7},
                        temperature_mode="relative"):
        (grad_v,) = torch.autograd.grad(F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=masking == "causal"), v, grad_out)
    scores = (q @ k.transpose(-2, -1) / 2).detach()
    spread = torch.stack([example[allowed.expand_as(example)].std() for example in scores])
    weights = torch.softmax((scores / (0.7 * spread.view(2, 1, 1, 1))).masked_fill(
        ~allowed, -math.inf), dim=-1)
    torch.testing.assert_close(grad_v, weights.transpose(-2, -1) @ grad_out)
