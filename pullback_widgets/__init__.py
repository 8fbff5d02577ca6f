"""pullback-widgets: excitation pullbacks (arXiv 2507.22832) with live Jupyter widgets."""

from .engine import (
    ExcitationPullback,
    PullbackSession,
    Unit,
    excitation_pullback,
    soft_gating,
)
from .gates import GATES, GateSettings

__all__ = [
    "GATES",
    "ExcitationPullback",
    "GateSettings",
    "PullbackSession",
    "Unit",
    "excitation_pullback",
    "soft_gating",
]
