"""Pre-activations a gate needs in its backward: kept from the forward, or remade there.

A soft gate multiplies the incoming gradient by g(z), so its backward needs the pre-activation
z. Keeping z holds one more activation map per gate (a copy, when the op runs in place). Where
the interception knows how z was made (an eval-mode batch norm, then residual sums), the
backward remakes it bit for bit from tensors autograd keeps anyway (:class:`Remake`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .validation import PullbackWidgetsError


@dataclass(frozen=True)
class Remake:
    """How the backward remakes a pre-activation instead of keeping it from the forward.

    ``op(*tensors)`` gives it bit for bit: the same calls on the same tensors (an eval-mode batch
    norm and its input, which that norm's own backward keeps anyway; then residual sums).
    Keeping the pre-activation would hold one more activation map per gate; remaking it costs
    one elementwise pass. ``versions``: the tensors' versions when the pre-activation was made;
    a remake is only valid while they are unchanged (:meth:`intact`).
    """

    tensors: tuple[Tensor | None, ...]
    op: Callable[..., Tensor]
    versions: tuple[int | None, ...]

    @staticmethod
    def of(tensors: tuple[Tensor | None, ...], op: Callable[..., Tensor]) -> Remake:
        """A remake from ``tensors`` as they are now."""
        return Remake(tensors, op, tuple(None if t is None else t._version for t in tensors))

    def intact(self) -> bool:
        """Nothing has changed the tensors in place since: the remake gives the same bits."""
        return all(t is None or t._version == version
                   for t, version in zip(self.tensors, self.versions))


_CHANGED_SINCE_FORWARD = (
    "a tensor the backward needs (an op's input, a layer's weights, or what a gate remakes its "
    "pre-activation from: a batch norm's input, statistics or parameters, a residual sum's "
    "operand) was changed in place after the forward used it: by a later step of the model's "
    "forward (make that step out of place), or after the forward (run a new forward, a new "
    "PullbackSession, after changing the model)")


def changed_in_place_error(error: BaseException) -> PullbackWidgetsError | None:
    """The clear error for autograd's "modified by an inplace operation" (a tensor saved for
    the backward, by a gate or by any other op, changed in place since); None for others."""
    if isinstance(error, RuntimeError) and "modified by an inplace operation" in str(error):
        return PullbackWidgetsError(_CHANGED_SINCE_FORWARD)
    return None


def saved_tensors(ctx) -> tuple[Tensor | None, ...]:
    """``ctx.saved_tensors``; a tensor changed in place since it was saved is a clear error."""
    try:  # not explained_errors: a generator context costs microseconds on every gate
        return ctx.saved_tensors
    except RuntimeError as error:
        clear = changed_in_place_error(error)
        if clear is None:
            raise
        raise clear from error


def keep_pre_activation(ctx, z: Tensor, inplace: bool, remake: Remake | None) -> None:
    """Save what the backward needs to have ``z`` again (call before an in-place op runs on
    it); :func:`kept_pre_activation` gives it back."""
    if remake is None:
        # An in-place op destroys z, and the soft gate needs its negative part.
        ctx.save_for_backward(z.clone() if inplace else z)
        ctx.remake_op = None
    else:  # saved, so autograd refuses them if they change before the backward
        ctx.save_for_backward(*remake.tensors)
        ctx.remake_op = remake.op


def kept_pre_activation(ctx) -> Tensor:
    """``z`` as saved by :func:`keep_pre_activation` (remade, when it was)."""
    saved = saved_tensors(ctx)
    return saved[0] if ctx.remake_op is None else ctx.remake_op(*saved)
