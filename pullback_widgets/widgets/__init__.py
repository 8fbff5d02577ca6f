"""The Jupyter widgets: PullbackExplorer and AscentExplorer."""

from .ascent import AscentExplorer
from .explorer import PullbackExplorer

__all__ = ["AscentExplorer", "PullbackExplorer"]
