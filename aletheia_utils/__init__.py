"""Aletheia's helper package: the plumbing behind the eight notebooks (see DESIGN.md).

Submodules load on first use (`au.sft`, `au.curate` …), so the `aletheia` command starts without
importing the training stack.
"""

import importlib
import logging

# On AVX512-BF16 CPUs bitsandbytes' CPU backend tries to fetch a 4-bit GEMM kernel from the Hub at import and warns
# when it cannot; the course runs offline and uses no 4-bit CPU kernel, so that line stays out of every stage's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

__all__ = ["config", "curate", "curate_scale", "data", "dpo", "embed", "evaluate", "files", "gateway", "generation",
           "gguf", "llamacpp", "merge", "models", "pii", "pipeline", "plots", "serve", "sft", "training"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
