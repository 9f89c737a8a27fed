"""Aletheia's helper package: the plumbing behind the eight notebooks (see DESIGN.md)."""

from . import config, curate, models, pipeline, plots

__all__ = ["config", "curate", "models", "pipeline", "plots"]
__version__ = "0.1.0"
