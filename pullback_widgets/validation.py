"""Argument checks shared by the whole package, and its own exception classes for user errors.

A :class:`PullbackWidgetsError` (a ``ValueError``) or :class:`PullbackWidgetsTypeError` (also a
``TypeError``) means the caller passed something wrong: the CLI prints it as one line, a widget
as a status line. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import numbers
import operator
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn


class PullbackWidgetsError(ValueError):
    """A user error: a bad argument, file or setting. The message says what to do."""


class PullbackWidgetsTypeError(PullbackWidgetsError, TypeError):
    """A user error of the wrong type (also a ``TypeError``)."""


def check_positive(value: object, name: str) -> float:
    """``value`` as a float if it is a finite real number > 0 (numpy scalars included)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise PullbackWidgetsTypeError(f"{name} must be a number, got {type(value).__name__}")
    try:
        as_float = float(value)
    except OverflowError:  # an int or fraction beyond float's range
        raise PullbackWidgetsError(
            f"{name} must be a finite number > 0, got one beyond float's range") from None
    if not math.isfinite(as_float) or as_float <= 0:
        raise PullbackWidgetsError(f"{name} must be a finite number > 0, got {value!r}")
    return as_float


FX_TRACING = (
    "torch.fx is tracing a model (torch.fx.symbolic_trace, in another thread?), which replaces "
    "nn.Module.__call__ for every thread while it runs: a forward run meanwhile would go into "
    "its graph instead of computing. Explain the model once the trace has finished")


def fx_tracing() -> bool:
    """Whether torch.fx's symbolic tracing is running, in any thread: while it runs it puts its
    own wrapper in ``nn.Module.__call__`` for the whole process (its flag for that is the
    tracing thread's own). Told by the wrapper's code: it borrows ``__call__``'s names."""
    code = getattr(nn.Module.__dict__.get("__call__"), "__code__", None)
    return code is not None and code.co_name == "module_call_wrapper" and \
        code.co_filename.endswith("_symbolic_trace.py")


def check_logits(output: object, batch: int | None = None) -> Tensor:
    """A model's output as logits (B, num_classes), else a clear error naming what it is;
    with ``batch``, B must be it (logits transposed, or for other examples, would otherwise
    be read row by row as the inputs' examples)."""
    fx = sys.modules.get("torch.fx")
    if fx is not None and isinstance(output, fx.Proxy):
        # A forward that ran while another thread traced: the module calls went to its graph.
        raise PullbackWidgetsError(FX_TRACING)
    if not isinstance(output, Tensor) or output.dim() != 2:
        raise PullbackWidgetsError(
            "the model must return logits of shape (B, num_classes), got "
            f"{tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__}")
    if not output.is_floating_point():
        raise PullbackWidgetsTypeError(
            f"the model must return floating-point logits, got {output.dtype}: there is no "
            "gradient to pull back")
    if batch is not None and len(output) != batch:
        raise PullbackWidgetsError(
            f"the model returned logits of shape {tuple(output.shape)} for a batch of {batch} "
            "examples: a pullback needs one row of logits per example, (B, num_classes)")
    return output


def check_finite(tensor: Tensor, what: str) -> Tensor:
    """``tensor`` if every value is finite, else a clear error: a map or a step made of NaN
    would be drawn, or taken, as if it meant something."""
    if not bool(torch.isfinite(tensor).all()):
        raise PullbackWidgetsError(f"{what} holds NaN or infinite values: the model's output or "
                                   "its gradient is not finite for this input")
    return tensor


def is_integer(value: object) -> bool:
    """True for any integer type (numpy's too) except bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_index(value: object, name: str, minimum: int = 0) -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (numpy integers included)."""
    if isinstance(value, bool):
        raise PullbackWidgetsTypeError(f"{name} must be an int, got a bool")
    try:
        as_int = operator.index(value)
    except TypeError:
        raise PullbackWidgetsTypeError(
            f"{name} must be an int, got {type(value).__name__}") from None
    if as_int < minimum:
        raise PullbackWidgetsError(f"{name} must be >= {minimum}, got {as_int}")
    return as_int


def check_choice(value: object, choices: Sequence[str], name: str) -> str:
    """``value`` if it is one of ``choices``; else an error that lists them."""
    if not isinstance(value, str):
        raise PullbackWidgetsTypeError(
            f"{name} must be a string, one of {tuple(choices)}, got {type(value).__name__}")
    if value not in choices:
        raise PullbackWidgetsError(
            f"{name} must be one of {tuple(choices)}, got {value!r}{suggest(value, choices)}")
    return value


def close_matches(name: str, choices: Iterable[str], n: int = 3,
                  cutoff: float = 0.5) -> list[str]:
    """Up to ``n`` of ``choices`` close to ``name``, best first; case-insensitive as fallback."""
    candidates = [c for c in choices if c]
    close = difflib.get_close_matches(name, candidates, n=n, cutoff=cutoff)
    if not close:
        lowered = {c.lower(): c for c in candidates}
        close = [lowered[c] for c in difflib.get_close_matches(
            name.lower(), list(lowered), n=n, cutoff=cutoff)]
    return close


def suggest(name: str, choices: Iterable[str], cutoff: float = 0.5) -> str:
    """A "; did you mean ...?" hint for a mistyped ``name``, or "" when nothing is close."""
    close = close_matches(name, choices, cutoff=cutoff)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


_TORCHSCRIPT_HINT = ("TorchScript runs compiled code whose ReLUs and max-pools the engine cannot "
                     "see, so every pullback would silently be the plain gradient. Pass the "
                     "eager nn.Module you scripted or traced instead.")
_COMPILED_HINT = ("torch.compile'd code is traced once, so the gate and temperature would be "
                  "frozen at the first call. Pass the module you compiled instead.")
_EXPORTED_HINT = ("An exported program runs torch's decomposed aten ops, whose ReLUs and "
                  "max-pools the engine does not gate, and it cannot be put in eval mode. Pass "
                  "the eager nn.Module you exported instead.")
_told_unwrapped: weakref.WeakSet = weakref.WeakSet()


def _compiled_module_type() -> type | None:
    # torch._dynamo takes seconds to import: if nobody imported it, nothing is compiled.
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def _exported_module_type() -> type | None:
    # What torch.export.export(...).module() returns; as above, no import if nobody exported.
    unlift = sys.modules.get("torch.export._unlift")
    return getattr(unlift, "_StatefulGraphModule", None)


def check_model(model: object, *, unwrap_compiled: bool = True) -> nn.Module:
    """``model`` as the eager ``nn.Module`` the engine will run.

    A ``torch.compile``'d model (``OptimizedModule``) is unwrapped to the module it compiled,
    with a warning the first time (``unwrap_compiled=False`` refuses it instead, for
    :func:`soft_gating`, where the user runs the model). So is an ``nn.DataParallel`` over
    several devices, whose replicas run in threads the thread-local gating does not reach.
    TorchScript models, and models with a compiled or scripted submodule (or such a
    DataParallel inside), are refused: the engine cannot see inside them.
    """
    if isinstance(model, (torch.jit.ScriptModule, torch.jit.ScriptFunction)):
        raise PullbackWidgetsTypeError(f"model is a TorchScript {type(model).__name__}. "
                                       + _TORCHSCRIPT_HINT)
    if not isinstance(model, nn.Module):
        raise PullbackWidgetsTypeError(
            f"model must be a torch.nn.Module, got {type(model).__name__}")
    compiled, exported = _compiled_module_type(), _exported_module_type()
    if compiled is not None and isinstance(model, compiled):
        model = _unwrapped(
            model._orig_mod, unwrap_compiled,
            "model is torch.compile'd; soft_gating cannot see inside it. Call model._orig_mod "
            "(the module you compiled) inside the context instead.",
            "model is torch.compile'd: the engine runs the module you compiled "
            "(model._orig_mod) in eager mode, since compiled code would freeze the gates")
    if _in_threads(model):
        model = _unwrapped(
            model.module, unwrap_compiled,
            f"model is an nn.DataParallel over {len(model.device_ids)} devices, whose replicas "
            "run in threads that soft_gating cannot see. Call model.module inside the context "
            "instead.",
            "model is an nn.DataParallel over several devices, whose replicas run in threads "
            "the soft gates cannot see: the engine runs model.module, on the inputs' device")
    modules = submodules(model)
    # By type first: isinstance against ScriptModule's metaclass is slow, and the engine checks
    # the model on every call (0.19 against 0.07 ms for Lite0's 274 modules).
    refused = tuple(kind for kind in (torch.jit.ScriptModule, compiled, exported,
                                      nn.DataParallel) if kind is not None)
    suspects = {kind for kind in {type(module) for module in modules}
                if issubclass(kind, refused)}
    for module in modules:
        if type(module) not in suspects and getattr(module, "_compiled_call_impl", None) is None:
            continue
        if isinstance(module, torch.jit.ScriptModule):
            raise PullbackWidgetsTypeError(f"{_where(model, module)} is a TorchScript module. "
                                           + _TORCHSCRIPT_HINT)
        if exported is not None and isinstance(module, exported):
            raise PullbackWidgetsTypeError(f"{_where(model, module)} is a torch.export "
                                           "program's module. " + _EXPORTED_HINT)
        if (compiled is not None and isinstance(module, compiled)) \
                or getattr(module, "_compiled_call_impl", None) is not None:
            raise PullbackWidgetsTypeError(f"{_where(model, module)} is compiled (torch.compile "
                                           f"or Module.compile()). " + _COMPILED_HINT)
        if _in_threads(module):
            raise PullbackWidgetsTypeError(
                f"{_where(model, module)} is an nn.DataParallel over several devices, whose "
                "replicas run in threads the soft gates cannot see; use its .module")
    return model


def _unwrapped(inner: nn.Module, allowed: bool, refusal: str, warning: str) -> nn.Module:
    """``inner``, the module a wrapper runs, with ``warning`` the first time for it; where
    unwrapping is not ``allowed`` (soft_gating, whose forward the user runs), ``refusal``."""
    if not allowed:
        raise PullbackWidgetsTypeError(refusal)
    if inner not in _told_unwrapped:
        _told_unwrapped.add(inner)
        warnings.warn(warning, stacklevel=4)
    return inner


def _in_threads(module: nn.Module) -> bool:
    """Whether ``module`` runs its forward in other threads: an ``nn.DataParallel`` over
    several devices (over one, or none, it calls its module in the caller's thread)."""
    return isinstance(module, nn.DataParallel) and len(module.device_ids) > 1


def submodules(model: nn.Module) -> list[nn.Module]:
    """Every module in ``model``, itself included, each once, as ``model.modules()`` gives them
    but without building their names (the engine walks a model on every call: 0.06 against
    0.15 ms for Lite0's 274 modules)."""
    found: dict[int, nn.Module] = {}
    stack = [model]
    while stack:
        module = stack.pop()
        if module is not None and id(module) not in found:  # a child may be None
            found[id(module)] = module
            stack.extend(module._modules.values())
    return list(found.values())


def _where(model: nn.Module, module: nn.Module) -> str:
    name = next(name for name, m in model.named_modules() if m is module)
    return f"submodule {name!r}" if name else "model"


def _expected_channels(model: nn.Module) -> int | None:
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first_conv is None else first_conv.in_channels


def check_inputs(inputs: object) -> Tensor:
    """Validate an image batch (B, C, H, W): a non-empty floating-point tensor of finite
    values. Whether it suits the model (channels, device, dtype) is told only if the model's
    forward fails on it (:func:`explained_forward_errors`): guessed from the model's modules
    beforehand, it would refuse models that take their input another way."""
    if not isinstance(inputs, Tensor):
        raise PullbackWidgetsTypeError(
            f"inputs must be a torch.Tensor of shape (B, C, H, W), got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise PullbackWidgetsError(
            f"inputs must have shape (B, C, H, W), got {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise PullbackWidgetsTypeError(
            f"inputs must be a floating-point tensor (pixel values in [0, 1]), got {inputs.dtype}")
    if inputs.numel() == 0:
        raise PullbackWidgetsError(
            f"inputs must hold at least one image with pixels, got shape {tuple(inputs.shape)}")
    if inputs.is_meta:
        raise PullbackWidgetsError("inputs are on the meta device, which holds no values")
    if inputs.layout != torch.strided:
        raise PullbackWidgetsTypeError(
            f"inputs must be a dense tensor, got layout {inputs.layout}: pass inputs.to_dense()")
    # The extremes are NaN where any value is (10x faster than isfinite(inputs).all()).
    if not torch.isfinite(torch.stack(torch.aminmax(inputs))).all():
        raise PullbackWidgetsError("inputs contain NaN or infinite values")
    return inputs


def _input_mismatch(model: nn.Module, inputs: Tensor) -> PullbackWidgetsError | None:
    """How ``inputs`` fail to suit ``model`` (its first convolution's channels, its first
    parameter's device and dtype, parameters or buffers made in inference mode), or None where
    they seem to."""
    channels = _expected_channels(model)
    if channels is not None and inputs.shape[1] != channels:
        return PullbackWidgetsError(f"inputs of shape {tuple(inputs.shape)} may not suit this "
                                    f"model, whose first declared convolution takes {channels} "
                                    "channels")
    parameter = next(model.parameters(), None)
    if parameter is not None and parameter.is_meta:  # moving the inputs there cannot help
        return PullbackWidgetsError(
            "the model is on the meta device, which holds no weights: materialise it "
            "(model.to_empty(device=...), then load_state_dict) before explaining it")
    if parameter is not None and parameter.device != inputs.device:
        return PullbackWidgetsError(f"inputs are on {inputs.device} but the model is on "
                                    f"{parameter.device}; move one of them")
    if parameter is not None and parameter.dtype != inputs.dtype:
        return PullbackWidgetsTypeError(f"inputs are {inputs.dtype} but the model's parameters "
                                        f"are {parameter.dtype}; convert one of them")
    if any(tensor.is_inference() for tensor in (*model.parameters(), *model.buffers())):
        # torch's own message reads as if the inputs were at fault.
        return PullbackWidgetsError(
            "the model's parameters or buffers were made under torch.inference_mode() and "
            "cannot take part in a backward: build or load the model outside inference_mode, "
            "or under torch.no_grad() instead")
    return None


@contextlib.contextmanager
def explained_errors(*explain: Callable[[Exception], PullbackWidgetsError | None]
                     ) -> Iterator[None]:
    """Around torch code: a RuntimeError (or NotImplementedError) it raises that one of
    ``explain`` knows becomes that clear error (chained to it); any other passes through."""
    try:
        yield
    except (RuntimeError, NotImplementedError) as error:
        clear = next((c for c in (known(error) for known in explain) if c is not None), None)
        if clear is None:
            raise
        raise clear from error


def explained_forward_errors(model: nn.Module, inputs: Tensor
                             ) -> contextlib.AbstractContextManager[None]:
    """Around a forward of ``model`` on ``inputs``: an error it raises where the inputs do not
    suit the model (:func:`_input_mismatch`) becomes a clear one, with the model's own first
    line; any other passes through as it is."""
    def mismatch(error: Exception) -> PullbackWidgetsError | None:
        clear = _input_mismatch(model, inputs)
        if clear is None and _wrong_picture_size(error):
            clear = PullbackWidgetsError(
                f"inputs of {inputs.shape[-2]} x {inputs.shape[-1]} px may not suit this model "
                "(the explorers and the command line show pictures of the model's input_size "
                "attribute, in pixels, square, else 224)")
        return None if clear is None else type(clear)(
            f"{clear}; the model's forward failed: {first_line(error)}")
    return explained_errors(mismatch)


# What torch and timm say where a picture's size does not fit a model's fixed layers: a Linear
# after a flatten, a position embedding added, timm's patch-embedding check.
_WRONG_SIZE_MESSAGES = ("shapes cannot be multiplied", "must match the size of tensor",
                        "doesn't match model")


def _wrong_picture_size(error: Exception) -> bool:
    return isinstance(error, (RuntimeError, AssertionError)) and any(
        message in str(error) for message in _WRONG_SIZE_MESSAGES)


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line (at most 200 characters), for one-line
    messages that quote it."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
