"""The paper's versions by name: settings you can splat into any call that takes gate settings.

``pw.excitation_pullback(model, x, t, **pw.PAPER_V1)``, ``pw.PullbackSession(model, x,
**pw.PAPER_LATEST)``, ``session.pullback(t, **pw.PAPER_V1)``, ``pw.ExcitationPullback(model,
**pw.PAPER_LATEST)``, ``pw.soft_gating(model, **...)``, ``pw.pullback_ascent(..., **...)`` and
``pw.ascent_grid(..., **...)`` all take them.

Temperatures are per kind of op (see :data:`pullback_widgets.gates.KINDS`): each version names
the ReLU-family and max-pool temperatures it defines; any other kind (SiLU, GELU, ...) keeps the
model's own default.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from types import MappingProxyType

from .gates import GateSettings
from .validation import PullbackWidgetsTypeError


class FrozenTemperatures(Mapping):
    """A read-only kind -> T mapping that, unlike ``MappingProxyType``, can be copied, pickled
    (settings sent to another process) and hashed; it equals a dict of the same items."""

    def __init__(self, items: Mapping[str, float]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> float:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


@dataclass(frozen=True)
class PaperSettings(Mapping):
    """One version's gate settings; a read-only mapping of keyword arguments.

    ``temperature``: kind -> T, in units of the pre-activations. ``gate``: the ReLU gate
    g(z/T). ``pool_weights``: the soft max-pool's softmax weights, differentiated or detached.
    ``temperature_mode``: "absolute", as the paper's temperatures are; a preset passed to a
    call of a session made with ``temperature_mode="relative"`` read them as relative.
    """

    gate: str
    temperature: Mapping[str, float]
    pool_weights: str
    temperature_mode: str = "absolute"

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, Mapping):
            raise PullbackWidgetsTypeError(
                "temperature must be a mapping of kind -> T, such as {'relu': 0.3}, got "
                f"{type(self.temperature).__name__}")
        GateSettings(**self)  # a preset is checked like any other settings
        object.__setattr__(self, "temperature", FrozenTemperatures(self.temperature))

    def __getitem__(self, key: str) -> object:
        if key not in self._keys():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys())

    def _keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in fields(self))


#: The first version (what this package implements by default): sigmoid gates, T = 0.3 for
#: ReLUs and max-pools, the soft pool's softmax weights differentiated.
PAPER_V1 = PaperSettings(gate="sigmoid", temperature={"relu": 0.3, "pool": 0.3},
                         pool_weights="differentiated")

#: The later version (the author's follow-up code): normal-CDF gates at T = 0.6 for ReLUs, the
#: soft pool at T = 0.3 with its softmax weights detached (constants in the backward), and that
#: code's per-kind temperatures for SiLU (1.6), GELU (1.0) and attention (1.0). Its LayerNorm
#: rule (constant statistics) is the package's only rule for norms, so it holds here too.
PAPER_LATEST = PaperSettings(gate="normal_cdf",
                             temperature={"relu": 0.6, "pool": 0.3, "silu": 1.6, "gelu": 1.0,
                                          "attention": 1.0},
                             pool_weights="detached")

#: The presets by the names the explorer's Gate control offers beside the raw gates.
PAPER_PRESETS: Mapping[str, PaperSettings] = MappingProxyType(
    {"paper v1": PAPER_V1, "paper latest": PAPER_LATEST})
