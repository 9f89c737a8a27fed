"""DPO with TRL's `DPOTrainer`, starting from the SFT adapter (03_dpo).

The reference model is the SFT policy itself: TRL copies the loaded adapter into a frozen "ref" adapter
on the same base weights, so no second copy of the model is held in memory. Its log-probabilities are computed
once, before training (`precompute_ref_log_probs`): a step then runs one policy forward per pair instead of a policy
and a reference forward, and the evaluations before and after training share one reference pass.
"""

from __future__ import annotations

import json
from pathlib import Path

from trl import DPOTrainer

from . import config as config_mod
from . import data, generation, gguf, merge, pipeline, training


def fit_pairs(rows: list[dict], tokenizer, style: str, max_len: int, policy: str) -> tuple[list[dict], int]:
    """`training.apply_overlong` for pairs, measured as the trainer will format the prompt with the longer of the two
    answers."""
    texts = [data.format_example(r["prompt"], max(r["chosen"], r["rejected"], key=len), style, tokenizer)
             for r in rows]
    return training.apply_overlong(rows, texts, tokenizer, max_len, policy)


def records(rows: list[dict], style: str) -> list[dict]:
    """Preference records TRL understands, in the format SFT trained on: conversational for the chat template (TRL
    applies it), plain text with the seed's markers otherwise (TRL appends the EOS token to chosen and rejected)."""
    if style == "chat_template":
        return [{"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows]
    return [{"prompt": data.format_prompt(r["prompt"], "markers"), "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in rows]


def policy_answers(cfg: config_mod.Config, adapter: Path, prompts: list[str]) -> list[generation.Answer]:
    """The SFT policy's own answers to `prompts`, prompted in `data.prompt_format`, up to `data.rejected_max_tokens`
    tokens. The embedded model: merged, converted to an F16 GGUF and decoded on llama-server's slots with
    `dpo.rejected_sampling` (the fast path on a CPU); any other model: transformers `generate`, plain greedy, on the
    adapter model."""
    import tempfile

    model, tokenizer = merge.load_adapter_model(cfg.run.base_model, adapter)
    limit, style = cfg.data.rejected_max_tokens, cfg.data.prompt_format
    if not cfg.run.base_model.startswith("embedded:"):
        return generation.hf_answers(model, tokenizer, prompts, style, max_new_tokens=limit)
    with tempfile.TemporaryDirectory(prefix=".policy-", dir=adapter.parent) as tmp:
        folder = merge.save_merged(model, tokenizer, Path(tmp) / "merged")
        del model
        with gguf.served_f16(folder, name="policy", workdir=tmp, parallel=cfg.serve.parallel,
                             ctx_size=cfg.dpo.max_seq_length + limit, threads=pipeline.use_threads(cfg)) as server:
            answers = generation.server_answers(
                server, prompts, max_new_tokens=limit, sampling=cfg.dpo.rejected_sampling.model_dump(),
                concurrency=cfg.serve.parallel, timeout=cfg.serve.request_timeout_s, style=style)[0]
            if None in answers:
                raise RuntimeError(f"llama-server failed {answers.count(None)} of {len(prompts)} policy answers; "
                                   f"last lines of its log:\n{server.log_tail()}")
    return answers


def policy_pairs(cfg: config_mod.Config, paths: pipeline.RunPaths) -> dict[str, Path]:
    """On-policy pairs (`dpo.rejected: policy`): 01's pairs with each rejected answer replaced by the SFT policy's own
    answer to the prompt (`policy_answers`), in `03_dpo/pairs/`. DPO then pushes down what this model actually does
    (its loops, its unfinished answers) rather than what the base model did. Made once per SFT adapter, data and
    settings; a rerun with the same inputs reads them back. Returns {"dpo": train file, "dpo_val": validation file}."""
    src, adapter, out = paths.root / "01_curate", paths.root / "02_sft" / "adapter", paths.stage("03_dpo") / "pairs"
    names = ("dpo", "dpo_val")
    key = training.fingerprint(cfg.run.base_model, cfg.data.prompt_format, cfg.data.rejected_max_tokens,
                               cfg.dpo.rejected_sampling.model_dump(),
                               files=(*(src / f"{n}.jsonl" for n in names), adapter / "adapter_model.safetensors"))
    made = {n: out / f"{n}.jsonl" for n in names}
    stamp = out / "made_from.json"
    if all(p.is_file() for p in (stamp, *made.values())) and json.loads(stamp.read_text())["fingerprint"] == key:
        return made
    rows = {n: data.load_split(src / f"{n}.jsonl", "dpo") for n in names}
    answers = iter(policy_answers(cfg, adapter, [r["prompt"] for n in names for r in rows[n]]))
    for n in names:
        own = [{**r, "rejected": a.text, "rejected_source": "sft_policy", "rejected_ended": a.ended}
               for r, a in zip(rows[n], [next(answers) for _ in rows[n]], strict=True)]
        data.write_jsonl(made[n], [r for r in own if r["rejected"].strip() and r["rejected"].strip() != r["chosen"]])
    pipeline.write_json(stamp, {"fingerprint": key})
    return made


class CrashSafeDPOTrainer(training.CrashSafeMixin, training.FastStepMixin, DPOTrainer):
    """TRL's `DPOTrainer` with crash-safe checkpoints (`fingerprint=`), bf16 activations fed to LoRA as they come, and
    on a CPU a plain LM head (`use_plain_head`) in place of TRL's chunked one."""

    def use_plain_head(self) -> None:
        """On a CPU, answer TRL's `fused_lm_head=True` calls with one plain head pass over the answer tokens only.

        TRL patches the model so that `model(..., labels=, fused_lm_head=True)` returns per-token log-probs, entropy,
        mean logit and top-1 (`FusedCausalLMOutput`) from a chunked head; off a GPU its torch fallback scores every
        position, prompt and padding included, in a dozen fp32 passes per logits tile, forward and again backward.
        Here the model's own forward projects only the positions whose next token is scored (`logits_to_keep` as a
        mask), one log-softmax gives the log-probs that carry the gradient, and the logged statistics come from it
        without one. Same fields, same loss (tests/test_dpo.py). Idempotent; TRL keeps its head on a GPU (Triton)."""
        import functools
        import types

        import torch
        from peft import PeftModel
        from trl.trainer.utils import FusedCausalLMOutput

        model = self.accelerator.unwrap_model(self.model)
        model = model.get_base_model() if isinstance(model, PeftModel) else model
        if self.args.device.type != "cpu" or getattr(model, "plain_head", False):
            return
        fused = model.forward  # TRL's: called with fused_lm_head=False it is the model's own forward

        @functools.wraps(type(model).forward)  # `generate` reads the model's keyword arguments from the signature
        def forward(_, *args, fused_lm_head=False, labels=None, num_items_in_batch=None, **kwargs):
            if not fused_lm_head or "shift_labels" in kwargs:
                return fused(*args, fused_lm_head=fused_lm_head, labels=labels, num_items_in_batch=num_items_in_batch,
                             **kwargs)
            scored = labels[:, 1:] != -100  # position t predicts token t + 1
            out = fused(*args, logits_to_keep=torch.nn.functional.pad(scored, (0, 1)), **kwargs)
            logits, targets = out.logits.float(), labels[:, 1:][scored]  # logits: (scored tokens, vocabulary)
            log_p = logits.log_softmax(-1)
            picked = log_p.gather(-1, targets[:, None])[:, 0]
            with torch.no_grad():
                stats = {"entropy": -(log_p.exp() * log_p).sum(-1), "mean_logits": logits.mean(-1),
                         "is_top1": logits.argmax(-1) == targets}
                if self.use_weighting:
                    stats["log_sum_sq_probs"] = torch.logsumexp(2 * log_p, -1)
            spread = {k: v.new_zeros(scored.shape).masked_scatter(scored, v) for k, v in stats.items()}
            count = scored.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
            return FusedCausalLMOutput(loss=-picked.sum() / count, label_mask=scored,
                                       log_probs=picked.new_zeros(scored.shape).masked_scatter(scored, picked),
                                       aux_loss=getattr(out, "aux_loss", None), **spread)

        model.forward, model.plain_head = types.MethodType(forward, model), True

    def compute_ref_log_probs(self, model, inputs):
        self.use_plain_head()  # TRL precomputes inside its __init__, right after fitting its own head
        return super().compute_ref_log_probs(model, inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.use_plain_head()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def prepare(cfg: config_mod.Config, paths: pipeline.RunPaths) -> training.Prepared:
    """What 03's trainer is built from: the curated pairs checked and fitted to `dpo.max_seq_length`, the base with the
    SFT adapter loaded trainable (the policy), the `DPOConfig` keyword arguments from the params (β, the loss types and
    their weights, precomputed reference log-probs), callbacks and fingerprint. Bad input raises here."""
    from datasets import Dataset
    from peft import PeftModel

    d, stage = cfg.dpo, paths.stage("03_dpo")
    adapter = paths.root / "02_sft" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise training.TrainingDataError(f"{adapter}: no SFT adapter (run 02_sft first)")
    pairs = policy_pairs(cfg, paths) if d.rejected == "policy" else {
        n: paths.root / "01_curate" / f"{n}.jsonl" for n in ("dpo", "dpo_val")}
    train_rows = data.load_split(pairs["dpo"], "dpo")
    val_rows = data.load_split(pairs["dpo_val"], "dpo")
    device = training.training_device(cfg.run.device)
    choice = training.choose_precision(d.precision, device)
    precision = choice["precision"]
    model, tokenizer = training.load_base(cfg.run.base_model, cfg.sft.load_in_8bit, precision, device)
    model = PeftModel.from_pretrained(model, str(adapter), is_trainable=True)
    style = cfg.data.prompt_format
    train_rows, over_train = fit_pairs(train_rows, tokenizer, style, d.max_seq_length, d.overlong)
    val_rows, over_val = fit_pairs(val_rows, tokenizer, style, d.max_seq_length, d.overlong)
    losses = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, d.sft_weight]} if d.sft_weight else {}
    args = training.training_args(d, stage / "checkpoints", cfg.run.seed, precision, device) | dict(
        beta=d.beta, max_length=d.max_seq_length, eval_strategy="steps", eval_steps=d.eval_steps,
        precompute_ref_log_probs=True, **losses)
    return training.Prepared(
        model=model, tokenizer=tokenizer, train_dataset=Dataset.from_list(records(train_rows, style)),
        eval_dataset=Dataset.from_list(records(val_rows, style)), args=args, callbacks=training.callbacks(stage),
        fingerprint=training.fingerprint(d.model_dump(), cfg.run.base_model, cfg.run.seed, style, files=(
            pairs["dpo"], pairs["dpo_val"], adapter / "adapter_model.safetensors")),
        info={"train_pairs": len(train_rows), "validation_pairs": len(val_rows),
              "device": device, "precision": precision, "precision_choice": choice,
              "beta": d.beta, "sft_weight": d.sft_weight, "rejected": d.rejected,
              "overlong": {"policy": d.overlong, "train": over_train, "validation": over_val}})


def build_trainer(cfg: config_mod.Config, paths: pipeline.RunPaths):
    """03's trainer, as the notebook builds it: `prepare`, then `DPOConfig` and `CrashSafeDPOTrainer` with no
    `ref_model` (TRL keeps the reference as a frozen copy of the SFT adapter). Returns (trainer, info)."""
    from trl import DPOConfig

    run = prepare(cfg, paths)
    trainer = CrashSafeDPOTrainer(
        model=run.model, ref_model=None, args=DPOConfig(**run.args), train_dataset=run.train_dataset,
        eval_dataset=run.eval_dataset, processing_class=run.tokenizer, callbacks=run.callbacks,
        fingerprint=run.fingerprint)
    return trainer, run.info


if __name__ == "__main__":
    raise SystemExit(training.run_main(None, build_trainer, "03_dpo"))
