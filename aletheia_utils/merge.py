"""Fold the trained LoRA adapter into the base weights and prove nothing changed (04_merge).

03_dpo continues training the SFT adapter itself, so the DPO adapter holds both stages' updates:
merging it alone into the base gives the final model.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import data, files, training


def load_adapter_model(base_model: str, adapter: Path):
    """(model, tokenizer): the base with the adapter applied, in eval mode, fp32."""
    from peft import PeftModel

    if not (adapter / "adapter_config.json").is_file():
        raise training.TrainingDataError(f"{adapter}: no adapter (run the training stages first)")
    model, tokenizer = training.load_base(base_model)
    return PeftModel.from_pretrained(model, str(adapter)).eval(), tokenizer


def save_merged(model, tokenizer, target: Path) -> Path:
    """`merge_and_unload` the adapter model, then `save_model`."""
    return save_model(model.merge_and_unload(), tokenizer, target)


def save_model(merged, tokenizer, target: Path) -> Path:
    """A merged model as a folder a server can load: safetensors + tokenizer (with its chat template, or the markers
    format as one if it has none) + a generation config whose EOS ids include the chat template's end-of-turn token;
    written atomically."""
    if tokenizer.chat_template is None:  # trained on markers: chat endpoints must prompt it the same way
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("x").input_ids[0] == tokenizer.bos_token_id
        tokenizer.chat_template = ("{{ bos_token }}" if adds_bos else "") + data.MARKERS_CHAT_TEMPLATE
    eos = sorted({tokenizer.eos_token_id, *([merged.generation_config.eos_token_id]
                                            if isinstance(merged.generation_config.eos_token_id, int)
                                            else merged.generation_config.eos_token_id or [])} - {None})
    merged.generation_config.eos_token_id = eos if len(eos) > 1 else eos[0]
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    with files.atomic_write(target) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def logits_on(model, tokenizer, prompts: list[str], style: str):
    """The logits at every position of each formatted prompt (one tensor per prompt)."""
    import torch

    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tokenizer(data.format_prompt(p, style, tokenizer), return_tensors="pt", add_special_tokens=False)
            out.append(model(**ids).logits[0].float())
    return out


def compare(reference: list, candidate: list) -> dict:
    """Max absolute logit difference and the share of positions whose argmax token agrees."""
    diffs = [float((a - b).abs().max()) for a, b in zip(reference, candidate, strict=True)]
    agree = [float((a.argmax(-1) == b.argmax(-1)).float().mean()) for a, b in zip(reference, candidate, strict=True)]
    return {"max_abs_diff": max(diffs), "argmax_agreement": sum(agree) / len(agree), "prompts": len(diffs)}


def model_card(target: Path, *, base_model: str, adapter: Path, data_files: list[Path], params: dict,
               metrics: dict, check: dict) -> Path:
    """README.md in the model folder: base, data with hashes, params, training metrics and the merge check."""
    lines = ["# Aletheia merged model", "", f"- Base model: `{base_model}`",
             f"- Adapter merged: `{adapter}` (SFT, then DPO on the same adapter)", "", "## Data", "",
             "| file | sha256 |", "| --- | --- |"]
    lines += [f"| `{f.name}` | `{data.sha256(f)}` |" for f in data_files if f.exists()]
    lines += ["", "## Training metrics", "", "```json", json.dumps(metrics, indent=2, default=str), "```",
              "", "## Merge check", "",
              f"Logits of the merged model against the adapter model on {check['prompts']} held-out prompts: "
              f"max |Δ| = {check['max_abs_diff']:.2e} (tolerance {check['tolerance']:.0e}), argmax agreement "
              f"{check['argmax_agreement']:.4f}, greedy answers identical on {check['greedy_identical']} of "
              f"{check['prompts']}.", "", "## Params", "", "```json", json.dumps(params, indent=2), "```", ""]
    return files.write_text(target / "README.md", "\n".join(lines))
