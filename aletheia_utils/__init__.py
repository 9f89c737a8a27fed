"""Aletheia's helper package: the plumbing behind the eight notebooks (see DESIGN.md).

Submodules load on first use (`au.sft`, `au.curate` …), so the `aletheia` command starts without
importing the training stack.
"""

import importlib

__all__ = ["config", "curate", "data", "dpo", "embed", "evaluate", "gateway", "generation", "gguf", "llamacpp", "merge",
           "models", "pii", "pipeline", "plots", "serve", "sft"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
