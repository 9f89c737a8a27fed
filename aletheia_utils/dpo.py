"""DPO with TRL's `DPOTrainer`, starting from the SFT adapter (03_dpo).

The reference model is the SFT policy itself: TRL copies the loaded adapter into a frozen "ref" adapter
on the same base weights, so no second copy of the model is held in memory. Its log-probabilities are computed
once, before training (`precompute_ref_log_probs`): a step then runs one policy forward per pair instead of a policy
and a reference forward, and the evaluations before and after training share one reference pass.
"""

from __future__ import annotations

from . import config as config_mod
from . import data, pipeline, sft


def fit_pairs(rows: list[dict], tokenizer, max_len: int, policy: str) -> tuple[list[dict], int]:
    """`sft.apply_overlong` for pairs, measured on the prompt with the longer of the two answers."""
    texts = [data.format_example(r["prompt"], max(r["chosen"], r["rejected"], key=len), "chat_template", tokenizer)
             for r in rows]
    return sft.apply_overlong(rows, texts, tokenizer, max_len, policy)


def records(rows: list[dict]) -> list[dict]:
    """Conversational preference records: TRL applies the chat template to prompt, chosen and rejected."""
    return [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]


def build_trainer(cfg: config_mod.Config, paths: pipeline.RunPaths):
    """DPOTrainer on the curated pairs, policy initialised from the SFT adapter. Returns (trainer, info)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    d, stage = cfg.dpo, paths.stage("03_dpo")
    data_dir, adapter = paths.root / "01_curate", paths.root / "02_sft" / "adapter"
    train_rows = data.load_split(data_dir / "dpo.jsonl", "dpo")
    val_rows = data.load_split(data_dir / "dpo_val.jsonl", "dpo")
    if not (adapter / "adapter_config.json").is_file():
        raise sft.TrainingDataError(f"{adapter}: no SFT adapter (run 02_sft first)")
    precision = sft.resolve_precision(d.precision)
    model, tokenizer = sft.load_base(cfg.run.base_model, cfg.sft.load_in_8bit, precision)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    train_rows, over_train = fit_pairs(train_rows, tokenizer, d.max_seq_length, d.overlong)
    val_rows, over_val = fit_pairs(val_rows, tokenizer, d.max_seq_length, d.overlong)
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, d.sft_weight]} if d.sft_weight else {}
    args = DPOConfig(**sft.training_args(d, stage / "checkpoints", cfg.run.seed, precision),
                     beta=d.beta, max_length=d.max_seq_length, eval_strategy="steps", eval_steps=d.eval_steps,
                     precompute_ref_log_probs=True, **losses)
    trainer_cls = type("CrashSafeDPOTrainer", (sft.CrashSafeMixin, sft.FastStepMixin, DPOTrainer), {})
    trainer = trainer_cls(model=model, ref_model=None, args=args, train_dataset=Dataset.from_list(records(train_rows)),
                          eval_dataset=Dataset.from_list(records(val_rows)), processing_class=tokenizer,
                          callbacks=sft.callbacks(stage))
    trainer.fingerprint = sft.fingerprint(d.model_dump(), cfg.run.base_model, cfg.run.seed, files=(
        data_dir / "dpo.jsonl", data_dir / "dpo_val.jsonl", adapter / "adapter_model.safetensors"))
    info = {"train_pairs": len(train_rows), "validation_pairs": len(val_rows), "precision": precision,
            "beta": d.beta, "sft_weight": d.sft_weight,
            "overlong": {"policy": d.overlong, "train": over_train, "validation": over_val},
            "adapters": list(trainer.model.peft_config)}
    return trainer, info


if __name__ == "__main__":
    raise SystemExit(sft.run_main(None, build_trainer, "03_dpo"))
