"""LoRA SFT with TRL's `SFTTrainer` (02_sft): the curated rows as TRL's prompt/completion records, fitted to
`sft.max_seq_length`, and the trainer built from them. The plumbing it shares with 03_dpo is in `training`.

`python -m aletheia_utils.sft --params FILE --run-dir DIR` runs the same training outside a notebook
(the crash-safety test kills that process; `accelerate launch` starts it on several processes).
"""

from __future__ import annotations

from pathlib import Path

from trl import SFTTrainer

from . import config as config_mod
from . import data, pipeline, training


def sft_records(rows: list[dict], style: str) -> list[dict]:
    """prompt/completion records TRL understands: conversational for the chat template, plain text with the
    seed's markers otherwise (TRL appends the EOS token to a plain completion)."""
    if style == "chat_template":
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "completion": [{"role": "assistant", "content": r["response"]}]} for r in rows]
    return [{"prompt": data.format_prompt(r["prompt"], "markers"), "completion": r["response"]} for r in rows]


def fit_to_length(rows: list[dict], tokenizer, style: str, max_len: int, policy: str) -> tuple[list[dict], int]:
    """`training.apply_overlong` for SFT rows, measured as the trainer will format them."""
    texts = [data.format_example(r["prompt"], r["response"], style, tokenizer) for r in rows]
    return training.apply_overlong(rows, texts, tokenizer, max_len, policy)


class CrashSafeSFTTrainer(training.CrashSafeMixin, training.PlainLossMixin, training.FastStepMixin, SFTTrainer):
    """TRL's `SFTTrainer` with crash-safe checkpoints (`CrashSafeMixin`, which takes `fingerprint=`), transformers'
    plain causal-LM loss on a CPU (`PlainLossMixin`) and bf16 activations fed to LoRA as they come (`FastStepMixin`)."""


def prepare(cfg: config_mod.Config, paths: pipeline.RunPaths) -> training.Prepared:
    """What 02's trainer is built from: the curated splits checked and fitted to `sft.max_seq_length`, the base model
    (+ `sft.init_adapter`) at the resolved precision with its LoRA targets checked, the `LoraConfig` and `SFTConfig`
    keyword arguments from the params, callbacks and fingerprint. Bad input raises here, before any training."""
    from datasets import Dataset
    from peft import PeftModel

    s, stage = cfg.sft, paths.stage("02_sft")
    data_dir = paths.root / "01_curate"
    train_rows = data.load_split(data_dir / "sft.jsonl", "sft")
    val_rows = data.load_split(data_dir / "sft_val.jsonl", "sft")
    if s.init_adapter and not (Path(s.init_adapter) / "adapter_config.json").is_file():
        raise training.TrainingDataError(f"sft.init_adapter: {s.init_adapter} is not an adapter folder "
                                         "(no adapter_config.json)")
    device = training.training_device(cfg.run.device)
    choice = training.choose_precision(s.precision, device)
    precision = choice["precision"]
    model, tokenizer = training.load_base(cfg.run.base_model, s.load_in_8bit, precision, device)
    training.check_target_modules(model, s.lora.target_modules)
    style = cfg.data.prompt_format
    train_rows, over_train = fit_to_length(train_rows, tokenizer, style, s.max_seq_length, s.overlong)
    val_rows, over_val = fit_to_length(val_rows, tokenizer, style, s.max_seq_length, s.overlong)
    if not train_rows:
        raise training.TrainingDataError(f"no training rows fit max_seq_length={s.max_seq_length}")
    if s.init_adapter:
        model = PeftModel.from_pretrained(model, s.init_adapter, is_trainable=True)
    args = training.training_args(s, stage / "checkpoints", cfg.run.seed, precision, device) | dict(
        max_length=s.max_seq_length, packing=s.packing, completion_only_loss=s.completion_only_loss,
        neftune_noise_alpha=s.neftune_noise_alpha, eval_strategy="steps" if val_rows else "no", eval_steps=s.eval_steps)
    return training.Prepared(
        model=model, tokenizer=tokenizer, train_dataset=Dataset.from_list(sft_records(train_rows, style)),
        eval_dataset=Dataset.from_list(sft_records(val_rows, style)) if val_rows else None,
        lora=None if s.init_adapter else training.lora_kwargs(s.lora), args=args, callbacks=training.callbacks(stage),
        fingerprint=training.fingerprint(s.model_dump(), cfg.run.base_model, cfg.run.seed, cfg.data.prompt_format,
                                         files=(data_dir / "sft.jsonl", data_dir / "sft_val.jsonl")),
        info={"train_rows": len(train_rows), "validation_rows": len(val_rows),
              "device": device, "precision": precision, "precision_choice": choice,
              "overlong": {"policy": s.overlong, "train": over_train, "validation": over_val},
              "init_adapter": s.init_adapter})


def build_trainer(cfg: config_mod.Config, paths: pipeline.RunPaths):
    """02's trainer, as the notebook builds it: `prepare`, then `LoraConfig`, `SFTConfig` and
    `CrashSafeSFTTrainer`. Returns (trainer, info)."""
    from peft import LoraConfig
    from trl import SFTConfig

    run = prepare(cfg, paths)
    trainer = CrashSafeSFTTrainer(
        model=run.model, args=SFTConfig(**run.args), peft_config=LoraConfig(**run.lora) if run.lora else None,
        train_dataset=run.train_dataset, eval_dataset=run.eval_dataset, processing_class=run.tokenizer,
        callbacks=run.callbacks, fingerprint=run.fingerprint)
    return trainer, run.info


if __name__ == "__main__":
    raise SystemExit(training.run_main(None, build_trainer, "02_sft"))
