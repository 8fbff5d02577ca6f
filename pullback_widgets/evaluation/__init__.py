"""Is an attribution faithful, and what does it cost? Metrics, methods and the dataset runner.

- :mod:`.metrics`: deletion/insertion AUC, infidelity, the randomisation check, ascent gain;
- :mod:`.methods`: attribution methods under stable names, Captum's wrapped, the Quantus
  adapter;
- :mod:`.ground_truth`: the synthetic-shapes benchmark, where the evidence is known
  (:func:`ground_truth_benchmark`);
- :mod:`.runner`: ``pullback-widgets evaluate`` over image folders, sharded with torchrun,
  resumable.

Every public name of metrics, methods and runner is re-exported here (``from
pullback_widgets.evaluation import deletion_auc``), and :func:`ground_truth_benchmark`.
"""

from .ground_truth import ground_truth_benchmark
from .methods import *  # noqa: F403
from .methods import __all__ as _methods_all
from .metrics import *  # noqa: F403
from .metrics import __all__ as _metrics_all
from .runner import *  # noqa: F403
from .runner import __all__ as _runner_all

__all__ = [*_metrics_all, *_methods_all, *_runner_all, "ground_truth_benchmark"]
