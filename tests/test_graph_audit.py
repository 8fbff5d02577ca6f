"""The graph audit: ops that kept their plain backward are named, compiled code is refused."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pullback_widgets as pw
from pullback_widgets.graph_audit import audit_graph
from pullback_widgets.session import NO_GATED_OP
from tests.reference import plain_input_gradient


class EveryGate(nn.Module):
    """One call of every op the engine gates, each counted once by name."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.prelu = nn.PReLU()
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)  # (B, 4, 8, 8)
        x = F.relu6(x) + F.silu(x) + F.gelu(x) + F.hardswish(x)
        x = self.prelu(F.leaky_relu(x)) + F.group_norm(x, 2)
        x = self.norm(x.flatten(2)[..., :8])  # (B, 4, 8)
        x = F.scaled_dot_product_attention(x, x, x)
        return self.head(x.mean(1))


EVERY_GATE_PLAIN = {"ReLU": 1, "max-pool": 1, "ReLU6/hardtanh": 1, "SiLU": 1, "GELU": 1,
                    "Hardswish": 1, "leaky ReLU": 1, "PReLU": 1, "GroupNorm": 1, "LayerNorm": 1,
                    "attention": 1}


def _session(model, inputs, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        session = pw.PullbackSession(model, inputs, **kwargs)
    return session, [str(w.message) for w in caught]


def test_audit_names_every_gated_op_in_a_plain_graph_and_none_in_a_gated_one():
    # The reference: autograd's own graph of the plain forward holds each gated op once. A
    # node name the audit did not know (another torch version) would be missing here.
    model, inputs = EveryGate().eval(), torch.rand(2, 3, 16, 16)
    leaf = inputs.clone().requires_grad_(True)
    assert audit_graph([model(leaf)], leaf).plain_gate_ops == EVERY_GATE_PLAIN
    session, caught = _session(model, inputs.detach())
    assert session.plain_gate_ops == {} and session.notices == ()
    assert sum(session.gated_kinds.values()) == sum(EVERY_GATE_PLAIN.values())
    assert caught == []


class UngatedOps(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        z = F.relu(self.conv(x))  # gated
        pooled, _ = F.max_pool2d(z, 2, return_indices=True)  # plain by design
        y = F.max_pool1d(pooled.flatten(2), 2)  # a 2-D pool in C++: unseen
        return F.elu(y).mean(2) + F.mish(y).mean(2) + F.softplus(y).mean(2)


def test_ungated_ops_are_counted_and_named_in_the_notices_and_warnings():
    session, caught = _session(UngatedOps().eval(), torch.rand(1, 3, 12, 12))
    assert session.plain_gate_ops == {"max-pool": 2, "ELU/SELU": 1, "Mish": 1, "Softplus": 1}
    assert session.gated_kinds == {"relu": 1}
    (notice,) = session.notices
    assert notice.startswith("5 op(s) on the input's path kept a backward the engine did not")
    assert "ELU/SELU ×1, Mish ×1, Softplus ×1, max-pool ×2" in notice
    assert caught == [notice]


def test_units_on_layers_off_the_logits_path_are_audited_too():
    class AuxiliaryHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.aux = nn.Conv2d(3, 2, 3), nn.ELU()

        def forward(self, x):
            z = self.conv(x)
            self.aux(z)  # recorded as a layer, but not on the logits' path
            return F.relu(z).mean((2, 3))

    model, inputs = AuxiliaryHead().eval(), torch.rand(1, 3, 8, 8)
    assert _session(model, inputs)[0].plain_gate_ops == {}
    assert _session(model, inputs, layers=["aux"])[0].plain_gate_ops == {"ELU/SELU": 1}


def _conv_then(helper):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(helper(self.conv(x)).mean((2, 3)))
    return Model().eval()


def test_a_scripted_function_inside_forward_is_named_then_refused():
    @torch.jit.script
    def scripted(x):
        return torch.relu(x) * 2.0

    model, inputs = _conv_then(scripted), torch.rand(1, 3, 8, 8)
    # TorchScript's profiling runs execute op by op: the ReLU's own node shows.
    session, caught = _session(model, inputs)
    assert session.plain_gate_ops == {"ReLU": 1} and session.gated_calls == 0
    assert caught == list(session.notices) and NO_GATED_OP in caught
    # Once optimised, the function is one opaque node: refused.
    with pytest.raises(pw.PullbackWidgetsError, match=r"torch\.jit\.script"):
        for _ in range(5):
            _session(model, inputs)


def test_a_compiled_function_inside_forward_is_refused_in_every_entry_point():
    pytest.importorskip("torch._dynamo")

    @torch.compile(backend="aot_eager")
    def compiled(x):
        return torch.relu(x) * 2.0

    model, inputs = _conv_then(compiled), torch.rand(1, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: pw.excitation_pullback(model, inputs, 0),
                 lambda: pw.PullbackSession(model, inputs),
                 lambda: pw.ExcitationPullback(model).attribute(inputs, target=1)):
        with pytest.raises(pw.PullbackWidgetsError, match=r"compiled with torch\.compile"):
            call()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training


class _OffPath(nn.Module):
    """Gate-like ops, a gate and compiled code that the input's gradient never passes: on
    parameters alone, and on an extra argument made outside the model."""

    def __init__(self, gated_table: bool = False):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.table = nn.Parameter(torch.randn(5, 4))
        self.gated_table = gated_table

    def forward(self, x, condition):
        scale = F.elu(self.table).sum(0)  # (4,): parameters alone
        if self.gated_table:
            scale = scale + F.relu(self.table).sum(0)
        return self.head(self.conv(x).mean((2, 3)) * scale) + condition


def test_only_ops_on_the_input_path_count():
    torch.manual_seed(0)
    condition_input = torch.randn(1, 8, requires_grad=True)
    condition = nn.Sequential(nn.Linear(8, 3), nn.ELU())(condition_input)  # history outside
    model, inputs = _OffPath(gated_table=True).eval(), torch.rand(2, 3, 8, 8)
    session, caught = _session(model, inputs, forward_args=(condition,))
    # The one ReLU is on parameters alone: nothing on the input's path is gated or plain.
    assert session.plain_gate_ops == {} and session.gated_calls == 0
    assert session.notices == (NO_GATED_OP,) and caught == [NO_GATED_OP]


def test_compiled_code_off_the_input_path_is_not_refused():
    pytest.importorskip("torch._dynamo")
    compiled = torch.compile(lambda t: F.elu(t) * 2.0, backend="aot_eager")
    condition = compiled(torch.randn(1, 3, requires_grad=True))
    model, inputs = _OffPath().eval(), torch.rand(1, 3, 8, 8)
    pullback = _session(model, inputs, forward_args=(condition,))[0].pullback(0)
    assert torch.isfinite(pullback).all()


class _DecomposedAndCustom(nn.Module):
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 2 * x * grad

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.rms, self.instance = nn.RMSNorm([6, 6]), nn.InstanceNorm2d(4, affine=True)

    def forward(self, x):
        z = F.relu(self.conv(x))
        z = self.rms(z) + self.instance(z) + self.Square.apply(z) + z.clamp(max=1.0)
        return z.amax((2, 3))


def test_decomposed_norms_custom_functions_clamps_and_max_are_named_hooks_are_not():
    model = _DecomposedAndCustom().eval()
    model.conv.register_full_backward_hook(lambda *args: None)  # torch's own Function
    session, _ = _session(model, torch.rand(2, 3, 8, 8))
    assert session.gated_kinds == {"relu": 1}
    assert session.plain_gate_ops == {
        "RMSNorm": 1, "InstanceNorm": 1, "custom autograd.Function Square": 1, "clamp": 1,
        "max/min over dims": 1}


def test_an_in_place_gate_on_a_slice_is_counted():
    class HalfReLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, 5)

        def forward(self, x):
            y = self.conv(x)
            y[:, :2].relu_()  # autograd wraps it in y's CopySlices node
            F.hardtanh(y[:, 2:], 0.0, 6.0, True)
            return self.head(y.mean((2, 3)))

    session, caught = _session(HalfReLU().eval(), torch.rand(2, 3, 8, 8))
    assert session.gated_kinds == {"relu": 2} and session.notices == () and caught == []


def test_a_function_compiled_with_the_eager_backend_is_refused():
    pytest.importorskip("torch._dynamo")
    compiled = torch.compile(lambda t: torch.relu(t) * 2.0, backend="eager")
    with pytest.raises(pw.PullbackWidgetsError, match=r"compiled with torch\.compile"):
        _session(_conv_then(compiled), torch.rand(1, 3, 8, 8))


def test_a_clamp_is_named_only_where_its_bound_cuts_a_value():
    class Clamps(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            z = F.relu(self.conv(x)).mean((2, 3))
            guarded = F.normalize(z, dim=1)  # its epsilon clamp binds nowhere
            return guarded + (z - 0.05).clamp(min=0.0) + torch.rms_norm(z, (4,))

    torch.manual_seed(0)
    session, _ = _session(Clamps().eval(), torch.rand(2, 3, 8, 8))
    # F.normalize's norm is a statistic of its input, kept plain: named, but not its clamp.
    assert session.plain_gate_ops == {"clamp": 1, "RMSNorm": 1,
                                      "statistics of a norm by hand (var/std/rsqrt/norm)": 1}


def test_the_notices_warning_points_at_the_callers_line():
    def make_session():
        return pw.PullbackSession(UngatedOps().eval(), torch.rand(1, 3, 12, 12))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_session()
        pw.excitation_pullback(UngatedOps().eval(), torch.rand(1, 3, 12, 12), 0)
    assert [w.filename for w in caught] == [__file__, __file__]


@pytest.mark.parametrize(("selection", "name"), [
    (lambda z: z.topk(2, dim=-1).values, "top-k/sort"),
    (lambda z: z.sort(dim=-1).values, "top-k/sort"),
    (lambda z: z.median(dim=-1, keepdim=True).values, "median/k-th value/mode"),
    (lambda z: z.kthvalue(2, dim=-1, keepdim=True).values, "median/k-th value/mode"),
    (lambda z: torch.fmax(z, 1.0 - z), "maximum/minimum"),
    (lambda z: z.cummax(dim=-1).values, "cumulative max/min"),
])
def test_hard_selections_are_named(selection, name):
    session, caught = _session(_conv_then(lambda z: selection(F.relu(z))), torch.rand(2, 3, 8, 8))
    assert session.gated_kinds == {"relu": 1}
    assert session.plain_gate_ops == {name: 1}
    assert any(name in message for message in caught)


class _BatchStatistics(nn.Module):
    """A batch norm that uses batch statistics in eval mode, as a module or a call."""

    def __init__(self, functional: bool):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
        self.norm = nn.BatchNorm2d(4, track_running_stats=False)
        self.functional = functional

    def forward(self, x):
        z = self.conv(x)
        z = F.batch_norm(z, None, None, training=True) if self.functional else self.norm(z)
        return self.head(F.relu(z).mean((2, 3)))


@pytest.mark.parametrize("functional", [False, True])
def test_a_batch_norm_on_batch_statistics_is_named(functional):
    # Its statistics stay differentiated (each example's pullback depends on the others'), so
    # the pullback says so; eval-mode batch norms with running statistics are not named.
    session, caught = _session(_BatchStatistics(functional).eval(), torch.rand(3, 3, 8, 8))
    assert session.plain_gate_ops == {"BatchNorm with batch statistics": 1}
    assert any("BatchNorm with batch statistics" in message for message in caught)
    running = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                            nn.Linear(4 * 6 * 6, 3)).eval()
    assert _session(running, torch.rand(3, 3, 8, 8))[0].notices == ()


def test_a_safe_softmax_counts_as_attention_left_plain():
    # What SDPA's math kernel leaves where it runs unseen (called through torch.ops.aten).
    model = _conv_then(lambda z: torch.ops.aten._safe_softmax(F.relu(z), -1))
    session, caught = _session(model, torch.rand(2, 3, 8, 8))
    assert session.plain_attention == 1 and any("softmax" in message for message in caught)


class _SqueezeExcite(nn.Module):
    """A squeeze-excite block as timm and torchvision write it: x · σ(fc(mean(x)))."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Conv2d(4, 4, 1)

    def forward(self, z):
        return z * torch.sigmoid(self.fc(z.mean((2, 3), keepdim=True)))


@pytest.mark.parametrize(("gated", "named"), [
    (_SqueezeExcite(), {"sigmoid/tanh gate": 1}),
    (lambda z: z * torch.sigmoid(z), {"sigmoid/tanh gate": 1}),  # SiLU by hand
    (lambda z: z * torch.sigmoid(1.702 * z), {"sigmoid/tanh gate": 1}),  # QuickGELU
    (lambda z: 0.5 * z * (1 + torch.tanh(0.8 * (z + 0.044715 * z ** 3))),
     {"sigmoid/tanh gate": 1}),  # GELU's tanh form by hand: scalar steps before the product
    (lambda z: torch.sigmoid(z).view(-1).view_as(z).mul(z.flip(1)), {"sigmoid/tanh gate": 1}),
    (lambda z: torch.tanh(z) * torch.sigmoid(z.flip(1)),  # an LSTM cell's o·tanh(c)
     {"sigmoid/tanh gate": 2}),
    (lambda z: F.glu(torch.cat([z, z], 1), dim=1), {"GLU": 1}),
    (lambda z: torch.sigmoid(z), {}),  # alone, a smooth activation: no gate
    (lambda z: torch.tanh(z) * torch.full_like(z, 3.0), {}),  # times a constant
    (lambda z: 2.0 * torch.sigmoid(z) + z, {}),  # a sum is no gate
])
def test_sigmoid_and_tanh_used_as_gates_are_named(gated, named):
    # Checked on the plain graph (autograd's own nodes) and through a session, which leaves
    # them plain: the engine softens no sigmoid or tanh.
    model = _conv_then(gated)
    inputs = torch.rand(2, 3, 8, 8)
    leaf = inputs.clone().requires_grad_(True)
    assert audit_graph([model(leaf)], leaf).plain_gate_ops == named
    session, caught = _session(model, inputs)
    assert session.plain_gate_ops == named
    assert all(any(name in message for message in caught) for name in named)


def test_a_sigmoid_head_and_a_learnt_scale_are_not_gates():
    # σ(logits) multiplies nothing on the input's path, nor does a tanh scaled by a parameter
    # (a DyT norm): neither is named.
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x):
            z = self.scale * torch.tanh(self.conv(x))
            return torch.sigmoid(self.head(F.relu(z).mean((2, 3))))

    session, caught = _session(Model().eval(), torch.rand(2, 3, 8, 8))
    assert session.plain_gate_ops == {} and caught == []


MASK = "mask from a comparison (a ReLU written by hand)"


def _relu_by_setitem(h):
    h = h.clone()
    h[h < 0] = 0.0
    return h


def _mask_made_under_no_grad(h):
    with torch.no_grad():
        mask = (h > 0).float()
    return h * mask


def _positive_by_indices(h):
    where = (h > 0).nonzero(as_tuple=True)
    return torch.zeros_like(h).index_put(where, h[where])


def test_a_mask_of_parameters_alone_is_no_gate():
    # A learned channel mask is the same for every input: not a gate of the input's path (a
    # review; the indexing routes had started to name it).
    class ChannelMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3), nn.Linear(4, 3)
            self.logits = nn.Parameter(torch.tensor([1.0, -1.0, 2.0, -0.5]))

        def forward(self, x):
            h = F.relu(self.conv(x))
            h = h * (self.logits > 0).float()[:, None, None]
            h[:, self.logits <= 0] = 0.0
            return self.head(h.mean((2, 3)))

    session, caught = _session(ChannelMask().eval(), torch.rand(2, 3, 8, 8))
    assert session.plain_gate_ops == {} and session.gated_kinds == {"relu": 1} and caught == []


def test_a_mask_of_path_values_taken_off_the_path_is_unnamed_but_the_notice_says_so():
    # As the README says: h.detach() > 0 cannot be told from a mask from elsewhere. Where it is
    # the model's only gate, the notice must still say that no op was gated.
    session, caught = _session(_conv_then(lambda h: h * (h.detach() > 0)), torch.rand(2, 3, 8, 8))
    assert session.plain_gate_ops == {} and session.gated_kinds == {}
    assert any("gated no op" in message for message in caught)


@pytest.mark.parametrize(("masked", "named"), [
    (lambda h: torch.where(h > 0, h, 0.0), {MASK: 1}),
    (lambda h: h.where(h > 0, 0.0), {MASK: 1}),
    (lambda h: h.masked_fill(h < 0, 0), {MASK: 1}),
    (lambda h: h.clone().masked_fill_(h <= 0, 0), {MASK: 1}),
    (lambda h: h * (h > 0), {MASK: 1}),
    (lambda h: (h > 0).float() * h, {MASK: 1}),
    (lambda h: torch.mul(h, torch.gt(h, 0).to(h.dtype)), {MASK: 1}),
    (lambda h: torch.where(~(h < 0), h, 0.1 * h), {MASK: 1}),  # a leaky ReLU by hand
    (_relu_by_setitem, {MASK: 1}),
    (lambda h: h.clone().index_put_((h < 0,), torch.tensor(0.0)), {MASK: 1}),
    (lambda h: torch.zeros_like(h).masked_scatter(h > 0, h[h > 0]), {MASK: 1}),
    (lambda h: torch.zeros_like(h).masked_scatter(h > 0, h.masked_select(h > 0)), {MASK: 1}),
    (_positive_by_indices, {MASK: 1}),
    (_mask_made_under_no_grad, {MASK: 1}),
    (lambda h: h * torch.lt(nn.Parameter(torch.zeros(())), other=h), {MASK: 1}),  # by keyword
    (lambda h: (h + h.abs()) / 2, {"abs": 1}),  # a ReLU by abs (a review)
    (lambda h: h[:, [1, 0, 3, 2]] * h[..., :1, :], {}),  # indexing, no mask
    (lambda h: h.masked_fill(torch.zeros_like(h, dtype=torch.bool), 0), {}),  # a fixed mask
    (lambda h: h * (torch.ones_like(h) > 0), {}),  # compares values off the input's path
    (lambda h: h * 2.0, {}),
])
def test_relus_written_as_masks_are_named(masked, named):
    # They kept their hard backward unnamed: the notice said every gate was soft (a review).
    session, caught = _session(_conv_then(masked), torch.rand(2, 3, 8, 8))
    assert session.plain_gate_ops == named and session.gated_kinds == {}
    assert all(any(name in message for message in caught) for name in named)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hard = session.pullback(1, gate="hard")
    assert torch.equal(hard, plain_input_gradient(session, 1))
