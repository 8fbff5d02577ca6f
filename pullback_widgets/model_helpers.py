"""Model helpers: default temperature, eval mode with flags restored, plain predictions, layers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .gates import KIND_TEMPERATURES, KINDS
from .model_state import ModelState
from .targets import TokenGrid
from .validation import (
    FX_TRACING,
    PullbackWidgetsError,
    PullbackWidgetsTypeError,
    check_choice,
    check_inputs,
    check_logits,
    check_model,
    check_positive,
    explained_forward_errors,
    fx_tracing,
    submodules,
    suggest,
)

DEFAULT_TEMPERATURE = 0.3
# The temperature strip's walk from gradient-like (0.01) to nearly linear in path space (10).
STRIP_TEMPERATURES = (0.01, 0.0316, 0.1, 0.316, 1.0, 3.16, 10.0)


def default_temperature(model: nn.Module) -> float:
    """The model's own default T (set by :func:`pullback_widgets.load_model`), else 0.3.

    A user's model may carry any value there: it is checked like a temperature argument (a
    0 would divide the temperature slider's scale by zero, a string pass as a number)."""
    return check_positive(getattr(model, "default_temperature", DEFAULT_TEMPERATURE),
                          "model.default_temperature")


def default_temperatures(model: nn.Module) -> dict[str, float]:
    """The model's default T per kind of gated op (keys :data:`gates.KINDS`).

    The package's per-kind defaults, with relu and pool replaced by the model's
    ``default_temperature`` where it has one, and any kind replaced by the model's own
    ``default_temperatures`` mapping where it has one.
    """
    temperatures = dict(KIND_TEMPERATURES)
    if hasattr(model, "default_temperature"):
        temperatures["relu"] = temperatures["pool"] = default_temperature(model)
    own = getattr(model, "default_temperatures", {})
    what = "model.default_temperatures"
    if not isinstance(own, Mapping):
        raise PullbackWidgetsTypeError(
            f"{what} must be a dict of temperatures by kind, got {type(own).__name__}")
    for kind, value in own.items():
        temperatures[check_choice(kind, KINDS, f"a key of {what}")] = check_positive(
            value, f"{what}[{kind!r}]")
    return temperatures



def scaled_temperatures(model: nn.Module, temperature: float,
                        base: Mapping[str, float] | None = None) -> dict[str, float]:
    """Per-kind temperatures, all scaled by the factor ``temperature`` ÷ the model's default
    ReLU-family T: how the explorers' single Temperature slider moves every kind of gate
    together (a SiLU model at its defaults keeps SiLU 1.6, GELU 1.0, ...).

    ``base`` (e.g. a paper preset's temperatures) replaces the model's defaults for the kinds it
    names before scaling, so at the slider's first value the preset holds exactly.
    """
    defaults = default_temperatures(model)
    factor = temperature / defaults["relu"]
    return {kind: t * factor for kind, t in {**defaults, **(base or {})}.items()}


def describe_temperatures(temperatures: dict[str, float], gated_kinds: Iterable[str]) -> str:
    """"T = 0.7", plus the other kinds' temperatures where the model has such gates,
    e.g. "T = 0.7 (silu 1.6, gelu 1)"."""
    others = [f"{kind} {temperatures[kind]:.3g}" for kind in dict.fromkeys(gated_kinds)
              if kind in temperatures and kind not in ("relu", "pool")]
    text = f"T = {temperatures['relu']:.3g}"
    return f"{text} ({', '.join(others)})" if others else text

# Every forward the package runs holds this lock: it sets a model's training flags and records
# layers on its modules, and two models may share modules (two heads on one backbone), so a
# lock per model would let two forwards interleave their flags on the shared ones.
_FORWARD_LOCK = threading.RLock()


def outputs_channels_last(model: nn.Module) -> bool:
    """Whether the model's layers output (B, H, W, C): timm's Swin-style models say so
    (``output_fmt``), torchvision's Swin Transformer is one."""
    return getattr(model, "output_fmt", None) == "NHWC" or \
        type(model).__name__ == "SwinTransformer"


def token_grid(model: nn.Module, inputs: Tensor) -> TokenGrid | None:
    """The token layout of a vision transformer at ``inputs`` (B, C, H, W), or None.

    Knows timm's ViTs (``num_prefix_tokens``, ``patch_embed.patch_size``) and torchvision's
    ``VisionTransformer`` (one class token, ``patch_size``).
    """
    patch_embed = getattr(model, "patch_embed", None)
    size = (inputs.shape[-2], inputs.shape[-1])
    if hasattr(model, "num_prefix_tokens") and callable(
            getattr(patch_embed, "dynamic_feat_size", None)):
        # timm's own count: it knows padding to whole patches and a hybrid's backbone stride.
        height, width = patch_embed.dynamic_feat_size(size)
        return TokenGrid(int(model.num_prefix_tokens), int(height), int(width))
    if hasattr(model, "num_prefix_tokens") and hasattr(patch_embed, "patch_size"):
        prefix, patch = int(model.num_prefix_tokens), patch_embed.patch_size
    elif hasattr(model, "class_token") and isinstance(getattr(model, "patch_size", None), int):
        prefix, patch = 1, model.patch_size
    else:
        return None
    patch_h, patch_w = (patch, patch) if isinstance(patch, int) else tuple(patch)
    return TokenGrid(prefix, size[0] // patch_h, size[1] // patch_w)


_TRAINED_DURING_THE_FORWARD = (
    "the model was put in train mode while the package ran its forward in eval mode (by its "
    "own forward, or by another thread), so that forward mixed the modes; do not switch modes "
    "inside forward(), nor train and explain one model at once: explain a copy "
    "(copy.deepcopy(model))")


_CHANGED_BY_TRAIN = (
    "the model's own train() changed its parameters or buffers when the package set its "
    "train-mode flags back after its eval-mode forward (a LoRA layer unmerging its weights?), "
    "so the backward would not match the forward: call model.eval() before explaining it")


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, graph_kept: bool = False) -> Iterator[None]:
    """Hold the package's forward lock, put every submodule in eval mode, restore each one's
    own flag.

    Train-mode BatchNorm would both mix the examples of a batch and update running statistics,
    which would change the user's model. The lock keeps another package forward's save and
    restore from interleaving with ours (which would leave a train-mode model in eval mode, or
    run our forward with Dropout on). The flags live on the model, shared by every thread: the
    user's own forwards in another thread meanwhile run in eval mode too, and a switch to train
    mode during ours is an error (that forward mixed the modes).

    Flags are set back through ``module.train(flag)``, as ``model.eval()`` set them: a module
    whose ``train()`` does more than set the flag (LoRA layers merge their weights in eval and
    unmerge them in train) is left as its own ``train()`` leaves it. ``submodules`` lists
    parents before their children, so a parent's ``train()``, which sets its children too, is
    followed by each child's own flag.

    ``graph_kept``: the caller pulls back through the forward's graph after this context. A
    ``train()`` that changes the model's tensors as the flags are set back (through ``.data``,
    which autograd does not see) is then an error: the backward would use other weights than
    the forward did.
    """
    with _FORWARD_LOCK:
        # torch.fx tracing in another thread sends every module call of every thread into its
        # graph: the forward would be garbage, and the user's traced graph would take it in.
        if fx_tracing():
            raise PullbackWidgetsError(FX_TRACING)
        flags = [(module, module.training) for module in submodules(model)]
        try:  # model.eval() too: a module's own train() may raise (or Ctrl-C come) half-way
            if any(training for _, training in flags):  # already in eval mode: nothing to set
                model.eval()
            try:
                yield
            except Exception as error:  # a trace began during the forward: fx's own errors
                if fx_tracing():
                    raise PullbackWidgetsError(FX_TRACING) from error
                raise
            if fx_tracing():
                raise PullbackWidgetsError(FX_TRACING)
            if any(module.training for module, _ in flags):
                raise PullbackWidgetsError(_TRAINED_DURING_THE_FORWARD)
            # The forward's graph holds the model's tensors: a train() that changes them through
            # .data (loralib unmerges its weights) would change the backward silently.
            used = ModelState.of(model) if graph_kept and any(t for _, t in flags) else None
        finally:
            for module, training in flags:
                if module.training != training:
                    module.train(training)
            for module, training in flags:  # a module shared by two parents: the later one's
                if module.training != training:  # train() may have set it again
                    module.training = training
        if used is not None and not used.matches(model):
            raise PullbackWidgetsError(_CHANGED_BY_TRAIN)


def as_model_input(model: nn.Module, images: Tensor) -> Tensor:
    """``images`` (B, 3, H, W), pixel space [0, 1], in the dtype and on the device of the
    model's first floating parameter (or buffer), where it has one: the package's photos are
    float32 on the CPU, and a float64, half-precision or GPU model refuses them."""
    for module in submodules(model):
        for tensor in (*module._parameters.values(), *module._buffers.values()):
            if tensor is not None and tensor.is_floating_point():
                return images.to(tensor.device, tensor.dtype)
    return images


def predict(model: nn.Module, inputs: Tensor) -> Tensor:
    """Plain logits (B, num_classes) for ``inputs``, in eval mode, without gradients."""
    with evaluation_mode(model), torch.no_grad(), explained_forward_errors(model, inputs):
        return check_logits(model(inputs), len(inputs))


def _channels_last_output(module: nn.Module, args: tuple, output: Tensor,
                          marked: dict[int, Tensor]) -> bool:
    """Whether ``module``'s 4-D ``output`` is laid out (B, H, W, C) inside a model whose other
    layers are (B, C, H, W), as in ConvNeXt's blocks: a Linear acts on the last dim, a
    LayerNorm over the last dim only, a ``Permute([0, 2, 3, 1])``, or a module whose input was
    such a map and whose output keeps its (B, H, W) (GELU, Dropout, an MLP), or a module
    that says so (timm's ``output_fmt="NHWC"``: a ViT's patch embedding at dynamic sizes)."""
    if output.dim() != 4:
        return False
    if isinstance(module, nn.Linear) or getattr(module, "output_fmt", None) == "NHWC":
        return True
    first = next((a for a in args if isinstance(a, Tensor)), None)
    if isinstance(module, nn.LayerNorm) and tuple(module.normalized_shape) == (
            output.shape[-1],) and (output.shape[1] != output.shape[-1] or (
                # H == C: its input a (0, 2, 3, 1) view of a (B, C, H, W) map tells
                first is not None and first.dim() == 4 and not first.is_contiguous()
                and first.permute(0, 3, 1, 2).is_contiguous())):
        return True
    if type(module).__name__ == "Permute" and list(getattr(module, "dims", ())) == [0, 2, 3, 1]:
        return True
    return first is not None and id(first) in marked and first.shape[:-1] == output.shape[:-1]


class LayerRecorder:
    """Forward hooks that keep a copy of chosen layers' outputs; removed by ``close()``.

    Only forwards run by the thread that made the recorder are recorded, so a forward the user
    runs on the same model in another thread is never mixed in. Use it as a context manager.
    ``copy=False`` keeps the outputs themselves, for when only their shapes matter.

    Every module's output is watched for 4-D maps laid out channels last (B, H, W, C) in a
    model whose layers are otherwise (B, C, H, W) (ConvNeXt's blocks): a recorded layer with
    such an output is listed in ``channels_last`` (a session refuses Units there, which would
    read rows as channels).

    The hook is a global one (``register_module_forward_hook``), not one on each module: the
    model holds nothing of the package's while it records, so another thread copying or saving
    the model meanwhile (``copy.deepcopy(model)``, ``torch.save(model)``) neither gets the
    recorder's hooks in its copy for good nor fails to pickle them. A global hook runs before a
    module's own forward hooks, so a module with forward hooks of its own gets a hook of its
    own instead, after them: it records the output the model goes on with.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], copy: bool = True) -> None:
        layers = tuple(layers)
        modules = dict(model.named_modules()) if layers else {}
        self.copy = copy
        self.outputs: dict[str, Tensor] = {}
        self.calls: dict[str, int] = {}
        self.channels_last: set[str] = set()
        self._marked: dict[int, Tensor] = {}  # id -> channels-last output, kept alive
        self._thread = threading.get_ident()
        self._handles: list = []
        # id of a module the global hook watches -> its name where it is recorded, else None.
        self._watched: dict[int, str | None] = {}
        try:
            for name in layers:
                if name not in modules:
                    raise PullbackWidgetsError(f"unknown layer {name!r}{suggest(name, modules)}")
            if layers:
                recorded = {id(modules[name]): name for name in layers}
                for module in dict.fromkeys(modules.values()):
                    if module._forward_hooks:  # the user's own: run after them
                        self._handles.append(module.register_forward_hook(
                            self._hook(recorded.get(id(module)))))
                    else:
                        self._watched[id(module)] = recorded.get(id(module))
                if self._watched:
                    self._handles.append(torch.nn.modules.module.register_module_forward_hook(
                        self._global_hook))
        except BaseException:
            self.close()
            raise

    def _global_hook(self, module, args, output):
        # Called for every module in every thread while the recorder lives, compiled code of
        # another thread's included: there a no-op dynamo reads as one (the thread's ident
        # would break its graph, with a warning in that thread).
        if not torch.compiler.is_compiling() and threading.get_ident() == self._thread \
                and id(module) in self._watched:
            self._record(self._watched[id(module)], module, args, output)

    def _hook(self, name: str | None):
        def record(module, args, output):
            if threading.get_ident() == self._thread:
                self._record(name, module, args, output)
        return record

    def _record(self, name: str | None, module: nn.Module, args: tuple, output: object) -> None:
        last = isinstance(output, Tensor) and _channels_last_output(
            module, args, output, self._marked)
        if last:
            self._marked[id(output)] = output
        if name is None:
            return
        self.calls[name] = self.calls.get(name, 0) + 1
        if isinstance(output, Tensor):
            # A copy, because the parent may overwrite this output in place (ReLU(inplace)).
            self.outputs[name] = output.clone() if self.copy else output
            if last:
                self.channels_last.add(name)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._watched.clear()
        self._marked.clear()

    def __enter__(self) -> LayerRecorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _is_flat_sequence(module: nn.Module) -> bool:
    """An ``nn.Sequential`` of leaves only (VGG's and AlexNet's ``features``): its children
    are the network's layers, so they are offered one by one."""
    return isinstance(module, nn.Sequential) and _has_children(module) and \
        not any(_has_children(child) for child in module.children())


def feature_layers(model: nn.Module, inputs: Tensor, *,
                   every: bool = False) -> dict[str, tuple[int, ...]]:
    """Layers worth pulling back from, with their output shapes (C, H, W) for ``inputs``.

    Those that run exactly once and return a (B, C, H, W) tensor, in ``named_modules()``
    order: top-level modules, containers (blocks, stages), and the leaves of a top-level flat
    ``nn.Sequential`` (VGG's ``features.0`` … ``features.28``), so that a flat network offers
    its convolutions and activations too; in a vision transformer also those that return a
    token map (B, N, C), given as (C, patch rows, patch columns) (see :func:`token_grid`).
    ``every=True``: every module, the leaves inside deep blocks included (hundreds on a
    ResNet-50). Runs one plain forward, no gradients.
    """
    model = check_model(model)
    check_inputs(inputs)
    modules = dict(model.named_modules())

    def offered(name: str) -> bool:
        if every or "." not in name or _has_children(modules[name]):
            return True
        parent = name.rsplit(".", 1)[0]
        return "." not in parent and _is_flat_sequence(modules[parent])

    candidates = [name for name in modules if name and offered(name)]
    with evaluation_mode(model), LayerRecorder(model, candidates, copy=False) as recorder, \
            torch.no_grad(), explained_forward_errors(model, inputs):
        model(inputs)
    outputs = recorder.outputs
    grid = token_grid(model, inputs)
    channels_last = outputs_channels_last(model)

    def shape(name: str) -> tuple[int, ...] | None:
        # Only what a Unit can address: no channels-last maps (rows would pass for channels),
        # and in a ViT no 4-D tensor off the patch grid (per-head queries and keys).
        output = outputs[name]
        if output.dim() == 4 and not channels_last and name not in recorder.channels_last and (
                grid is None or tuple(output.shape[2:]) == (grid.height, grid.width)):
            return tuple(output.shape[1:])
        if grid is not None and output.dim() == 3 and output.shape[1] == grid.tokens:
            return output.shape[2], grid.height, grid.width
        return None

    shapes = {name: shape(name) for name in candidates
              if name in outputs and recorder.calls[name] == 1}
    return {name: value for name, value in shapes.items() if value is not None}
