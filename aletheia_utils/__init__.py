"""Aletheia's helper package: the plumbing behind the eight notebooks (see DESIGN.md)."""

from . import config, models, pipeline

__all__ = ["config", "models", "pipeline"]
__version__ = "0.1.0"
