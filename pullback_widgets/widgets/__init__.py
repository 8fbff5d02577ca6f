"""The Jupyter widgets: PullbackExplorer and AscentExplorer."""

from .explorer import PullbackExplorer

__all__ = ["PullbackExplorer"]
