"""pullback-widgets: excitation pullbacks (arXiv 2507.22832) with live Jupyter widgets."""

from importlib.metadata import PackageNotFoundError, version

from . import evaluation, synthetic
from .ascent import AscentGrid, AscentResult, ascent_grid, pullback_ascent
from .evaluation.methods import quantus_explain_func
from .figures import (
    ascent_frames,
    labelled_grid,
    magnitude_overlay,
    rgb_difference,
    side_by_side,
    signed_heatmap,
    signed_range,
    temperature_strip,
    topk_bar,
)
from .gates import GATES, GateSettings
from .images import SAMPLE_IMAGES, load_image, sample_image
from .interception import soft_gating
from .models import MODELS, imagenet_labels, load_model
from .paper import PAPER_LATEST, PAPER_V1, PaperSettings
from .session import ExcitationPullback, PullbackSession, excitation_pullback
from .targets import Unit
from .validation import PullbackWidgetsError, PullbackWidgetsTypeError
from .widgets import AscentExplorer, PullbackExplorer

try:  # pyproject.toml's version, as installed: the one source of truth
    __version__ = version("pullback-widgets")
except PackageNotFoundError:  # imported from a checkout that was never installed
    __version__ = "0+unknown"

__all__ = [
    "GATES",
    "MODELS",
    "PAPER_LATEST",
    "PAPER_V1",
    "SAMPLE_IMAGES",
    "AscentExplorer",
    "AscentGrid",
    "AscentResult",
    "ExcitationPullback",
    "GateSettings",
    "PaperSettings",
    "PullbackExplorer",
    "PullbackSession",
    "PullbackWidgetsError",
    "PullbackWidgetsTypeError",
    "Unit",
    "ascent_frames",
    "ascent_grid",
    "evaluation",
    "excitation_pullback",
    "imagenet_labels",
    "labelled_grid",
    "load_image",
    "load_model",
    "magnitude_overlay",
    "pullback_ascent",
    "quantus_explain_func",
    "rgb_difference",
    "sample_image",
    "side_by_side",
    "signed_heatmap",
    "signed_range",
    "soft_gating",
    "synthetic",
    "temperature_strip",
    "topk_bar",
]
