"""What a gate's backward reads from the forward is saved for it by autograd, never kept on ctx:
a freeing backward frees it as it passes, and a tensor changed in place since is refused with a
clear error, never read. Norm and attention gates save the model's call's inputs and make the
call again for the hard gate."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import pullback_widgets as pw
from pullback_widgets import interception
from pullback_widgets.graph_audit import audit_graph


class TokenBlock(nn.Module):
    """Patches -> tokens -> LayerNorm -> attention -> logits, with handles on the tensors the
    gates take: ``seen`` holds weak references to the memory of the norm's input and of q, k
    and v (a detached copy would keep that memory, not the tensor object)."""

    def __init__(self, change_in_place: str | None = None):
        super().__init__()
        self.embed, self.norm = nn.Linear(48, 8), nn.LayerNorm(8)
        self.qkv, self.head = nn.Linear(8, 24), nn.Linear(8, 3)
        self.change_in_place = change_in_place
        self.seen: dict[str, StorageWeakRef] = {}

    def forward(self, x):
        tokens = F.unfold(x, 4, stride=4).transpose(1, 2)  # (B, 16, 48)
        h = self.embed(tokens) * 1.0
        y = self.norm(h)
        q, k, v = (t.contiguous() for t in self.qkv(y).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        self.seen.update({name: StorageWeakRef(t.untyped_storage()) for name, t in
                          (("norm_input", h), ("query", q), ("key", k), ("value", v))})
        if self.change_in_place == "norm_input":
            h.mul_(2.0)
        elif self.change_in_place == "value":
            v.add_(1.0)
        return self.head((out + y + h).mean(1))


@pytest.mark.parametrize("gate", ["sigmoid", "hard"])
def test_a_freeing_backward_frees_the_norm_and_attention_inputs_as_it_passes(gate):
    torch.manual_seed(0)
    model = TokenBlock().eval()
    leaf = torch.rand(2, 3, 16, 16).requires_grad_()
    with interception._gating(pw.GateSettings(0.5, gate)) as mode:
        logits = model(leaf * 1.0)
    kinds = audit_graph([logits], leaf, mode.gated_nodes).gated_kinds
    assert kinds["norm"] == 1 and kinds["attention"] == 1
    alive_at_the_end = {}
    leaf.register_hook(lambda grad: alive_at_the_end.update(
        {name: not ref.expired() for name, ref in model.seen.items()}))
    torch.autograd.grad(logits[:, 1].sum(), leaf)
    # The graph (logits) is still alive: only the gates' saved inputs could keep these.
    assert alive_at_the_end == dict.fromkeys(("norm_input", "query", "key", "value"), False)


@pytest.mark.parametrize("gate", ["sigmoid", "hard"])
@pytest.mark.parametrize("changed", ["norm_input", "value"])
def test_an_input_changed_in_place_after_the_call_is_a_clear_error(changed, gate):
    # The soft rules read the norm's input and attention's q, k, v in the backward: changed in
    # place by the model after the call, they would give a wrong pullback without a word.
    # Plain autograd refuses these models too.
    torch.manual_seed(0)
    model = TokenBlock(change_in_place=changed).eval()
    x = torch.rand(1, 3, 16, 16)
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)
    with pytest.raises(pw.PullbackWidgetsError, match="changed in place after the forward"):
        pw.excitation_pullback(model, x, 1, gate=gate)
    model.change_in_place = None  # the control: the same model without the change
    pw.excitation_pullback(model, x, 1, gate=gate)


def test_the_hard_gate_makes_the_call_again_for_the_same_bits_in_a_session():
    # The hard gate's backward runs the model's call again from the saved inputs: a session
    # alternating rules gives autograd's own gradient each time it is hard.
    torch.manual_seed(0)
    model = TokenBlock().eval()
    x = torch.rand(2, 3, 16, 16)
    leaf = x.clone().requires_grad_()
    (plain,) = torch.autograd.grad(model(leaf)[:, 2].sum(), leaf)
    session = pw.PullbackSession(model, x)
    for gate in ("hard", "sigmoid", "hard"):
        pullback = session.pullback(2, gate=gate)
        assert torch.equal(pullback, plain) == (gate == "hard")


class ChangesAGateInput(nn.Module):
    """A ReLU or max-pool whose input the model changes in place after the op."""

    def __init__(self, op):
        super().__init__()
        self.conv, self.op, self.head = nn.Conv2d(3, 4, 3), op, nn.Linear(4, 3)

    def forward(self, x):
        z = self.conv(x)
        out = self.op(z)
        z.mul_(2.0)
        return self.head(out.mean((2, 3)))


@pytest.mark.parametrize("op", [nn.ReLU(), nn.MaxPool2d(2)], ids=["relu", "max_pool"])
def test_a_relu_or_pool_input_changed_in_place_after_the_op_is_a_clear_error(op):
    # Autograd's own ReLU keeps its output, so the plain gradient of this ReLU model runs; the
    # soft gate needs the input itself. A clear refusal, not autograd's traceback.
    torch.manual_seed(0)
    model = ChangesAGateInput(op).eval()
    x = torch.rand(1, 3, 12, 12)
    with pytest.raises(pw.PullbackWidgetsError, match="changed in place after the forward"):
        pw.excitation_pullback(model, x, 1)
