"""SFT tokens/s, side by side in one run: TRL's `SFTTrainer` with stock settings vs the project's 02_sft path
(`au.sft.build_trainer`), on the same curated rows, the same LoRA config and the same optimizer settings.

    .venv/bin/python benchmarks/train_sft.py [--steps 8] [--run-dir runs/default-check]

Both train `--steps` optimizer steps from the same seed on the same batches; the training losses per step and the
validation loss afterwards are compared (same result, faster). Each variant's model FLOP/s over its training time
(`model_flops`) is set against the machine's matmul peak, measured at the start of the run (`common.matmul_peak`).
Writes benchmarks/results/train_sft.{json,png}.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time

import common
import flops
import torch
from transformers import TrainerCallback

import aletheia_utils as au


def stock_trainer(cfg, rows, bf16: bool | None):
    """`SFTTrainer` as its docs show it: the fp32 checkpoint, a `peft_config`, default `SFTConfig` (bf16 autocast
    unless `bf16=False`) except for the
    settings that define the optimization and the data (the project's values; the default micro-batch of 8 rows,
    capped at the project's effective batch, with accumulation making up the rest)."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    s = cfg.sft
    micro, accumulation = common.stock_batches(s.per_device_batch_size, s.gradient_accumulation_steps)
    torch.manual_seed(cfg.run.seed)  # as before the project's build: the same LoRA initialisation
    model, tok = au.training.load_base(cfg.run.base_model)
    args = SFTConfig(output_dir=tempfile.mkdtemp(prefix="stock-sft-"), use_cpu=True, bf16=bf16, report_to="none",
                     per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
                     gradient_accumulation_steps=accumulation, learning_rate=s.learning_rate,
                     lr_scheduler_type=s.lr_scheduler, warmup_steps=s.warmup_ratio, weight_decay=s.weight_decay,
                     max_steps=s.max_steps, logging_steps=1, save_strategy="no", seed=cfg.run.seed,
                     data_seed=cfg.run.seed, max_length=s.max_seq_length, packing=s.packing,
                     completion_only_loss=s.completion_only_loss, include_num_input_tokens_seen=True)
    data = Dataset.from_list(au.sft.sft_records(rows, "chat_template"))
    return SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                      peft_config=LoraConfig(**au.training.lora_kwargs(s.lora)))


def project_trainer(cfg, run_root):
    """`au.sft.build_trainer` as 02_sft calls it; only its periodic evaluation and checkpoints are switched off
    (transformers evaluates and saves after the last step), so both variants time the same training."""
    from transformers.trainer_utils import IntervalStrategy, SaveStrategy

    torch.manual_seed(cfg.run.seed)
    trainer, _ = au.sft.build_trainer(cfg, au.pipeline.RunPaths.for_run(cfg, run_root))
    trainer.args.eval_strategy, trainer.args.save_strategy = IntervalStrategy.NO, SaveStrategy.NO
    return trainer


def swapped_dropout_trainer(cfg, run_root, make):
    """The project's path with every LoRA input dropout replaced by `make(p)`."""
    trainer = project_trainer(cfg, run_root)
    for module in trainer.model.modules():
        for name, dropout in getattr(module, "lora_dropout", {}).items():
            if isinstance(dropout, au.training.SharedDropout):
                module.lora_dropout[name] = make(dropout.p)
    return trainer


class TorchMaskDropout(au.training.SharedDropout):
    """One mask per input as in the project, drawn by torch's own dropout (a Mersenne Twister draw an element)."""

    def draw(self, x):
        return torch.nn.Dropout.forward(self, x)


def compiled_trainer(cfg, run_root):
    """The project's path with every decoder layer compiled by `torch.compile` (inductor: generated C++ on a CPU;
    `Module.compile` in place, so PEFT's and transformers' own modules stay). The first steps pay the compilation
    (and a recompilation once a new sequence length makes the shapes dynamic): `step_s` shows where."""
    trainer = project_trainer(cfg, run_root)
    for layer in trainer.model.base_model.model.model.layers:
        layer.compile()
    return trainer


class StepTimes(TrainerCallback):
    """The wall time of every optimizer step."""

    def __init__(self):
        self.times: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)


def model_flops(trainer, tokens: int) -> dict:
    """The model FLOPs of training `tokens` tokens (`flops.model_flops_per_token`): the trainer's LoRA weights, the
    mean causal context of its packed sequences and the logits of the scored (completion) tokens only."""
    stats = flops.packed_stats(trainer.train_dataset)
    lora = flops.trainable_params(trainer.model)
    per_token = flops.model_flops_per_token(trainer.model.config, lora, stats["context"], stats["head_fraction"])
    return {"lora_params": lora, "attention_context": stats["context"], "head_fraction": stats["head_fraction"],
            "model_flops_per_token": per_token, "flops": tokens * per_token}


def measure(name: str, build, val_dataset, peak: dict) -> dict:
    """Train, then evaluate on the validation rows; tokens/s counts the real (unpadded) input tokens, model FLOP/s
    the model FLOPs of those tokens over the same training time, against the machine's matmul `peak`."""
    with common.Timer() as built:
        trainer = build()
    lora_a = next(p for n, p in trainer.model.named_parameters() if "lora_A" in n)
    init_checksum = float(lora_a.detach().double().sum())
    steps = StepTimes()
    trainer.add_callback(steps)
    load = list(common.os.getloadavg())
    with common.Timer() as trained:
        output = trainer.train()
    with common.Timer() as evaluated:
        val = trainer.evaluate(eval_dataset=val_dataset)
    tokens = trainer.state.num_input_tokens_seen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    counted = model_flops(trainer, tokens)
    precision = "bf16" if trainer.args.bf16 else "fp32"
    row = {"variant": name, "build_s": built.s, "train_s": trained.s, "train_cpu_s": trained.cpu_s,
           "micro_batch": trainer.args.per_device_train_batch_size,
           "gradient_accumulation": trainer.args.gradient_accumulation_steps,
           "trainer_runtime_s": output.metrics["train_runtime"],
           "tokens": tokens, "tokens_per_s": tokens / trained.s,
           "tokens_per_cpu_s": tokens / trained.cpu_s, "steps": trainer.state.global_step,
           "loss_per_step": losses, "train_loss": output.training_loss, "val_loss": val["eval_loss"],
           "val_s": evaluated.s, "precision": precision, "step_s": steps.times,
           **common.against_peak(counted.pop("flops"), trained.s, peak, precision), **counted,
           "lora_A_init_checksum": init_checksum, "load_average_before": load}
    print(f"{name}: {row['tokens_per_s']:.1f} tokens/s, {row['model_flops_per_s'] / 1e9:.1f} model GFLOP/s, "
          f"{row['fraction_of_peak']:.1%} of the matmul peak", flush=True)
    return common.shown(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--val-rows", type=int, default=16, help="validation rows scored after training")
    parser.add_argument("--run-dir", default=None, help="finished run whose 01_curate data is used")
    parser.add_argument("--variants", default="stock,project",
                        help="also: stock-fp32 (stock with bf16=False), project-own-masks (a dropout mask per "
                             "adapter, torch's draw), project-torch-masks (a mask per input, torch's draw), "
                             "project-compiled (torch.compile over the decoder layers)")
    parser.add_argument("--name", default="train_sft", help="results/<name>.json and .png")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--profile-steps", type=int, default=0, help="then profile this many project steps")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = common.source_run(args.run_dir)
    machine = common.machine()
    peak = common.matmul_peak()  # at the thread count training runs with
    cfg = au.config.load(common.ROOT / "params" / "default.yaml", {"sft.max_steps": args.steps, "sft.logging_steps": 1})
    from datasets import Dataset

    _, tok = au.training.load_base(cfg.run.base_model)
    rows, _ = au.sft.fit_to_length(au.data.load_split(source / "01_curate" / "sft.jsonl", "sft"), tok, "chat_template",
                                   cfg.sft.max_seq_length, cfg.sft.overlong)
    val_rows, _ = au.sft.fit_to_length(au.data.load_split(source / "01_curate" / "sft_val.jsonl", "sft"), tok,
                                       "chat_template", cfg.sft.max_seq_length, cfg.sft.overlong)
    val = Dataset.from_list(au.sft.sft_records(val_rows[:args.val_rows], "chat_template"))
    rows_out, profiled = [], None
    with common.scratch_run(source, "01_curate") as run_root:
        builders = {"stock": lambda: stock_trainer(cfg, rows, bf16=None),
                    "stock-fp32": lambda: stock_trainer(cfg, rows, bf16=False),
                    "project-own-masks": lambda: swapped_dropout_trainer(cfg, run_root, torch.nn.Dropout),
                    "project-torch-masks": lambda: swapped_dropout_trainer(cfg, run_root, TorchMaskDropout),
                    "project": lambda: project_trainer(cfg, run_root),
                    "project-compiled": lambda: compiled_trainer(cfg, run_root)}
        for name in args.variants.split(","):
            rows_out.append(measure(name, builders[name], val, peak))
        if args.profile_steps:
            short = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"max_steps": args.profile_steps})})
            profiled = common.profile(project_trainer(short, run_root).train)
    base = rows_out[0]
    for r in rows_out:
        r["speedup_vs_" + base["variant"]] = r["tokens_per_s"] / base["tokens_per_s"]
        r["cpu_speedup_vs_" + base["variant"]] = r["tokens_per_cpu_s"] / base["tokens_per_cpu_s"]
        pairs = zip(r["loss_per_step"], base["loss_per_step"], strict=True)
        r["max_abs_step_loss_diff"] = max(abs(a - b) for a, b in pairs)
        r["val_loss_diff"] = r["val_loss"] - base["val_loss"]
    assert len({r["tokens"] for r in rows_out}) == 1, "every variant must train on the same tokens"
    assert all(math.isfinite(r["val_loss"]) for r in rows_out)
    summary = {r["variant"]: {"tokens_per_s": round(r["tokens_per_s"], 1),
                              "speedup": round(r["speedup_vs_" + base["variant"]], 2),
                              "cpu_time_speedup": round(r["cpu_speedup_vs_" + base["variant"]], 2),
                              "model_gflops_per_s": round(r["model_flops_per_s"] / 1e9, 1),
                              "fraction_of_peak": round(r["fraction_of_peak"], 4),
                              "train_loss": round(r["train_loss"], 4), "val_loss": round(r["val_loss"], 4)}
               for r in rows_out}
    print(summary)
    common.write(args.name, {"machine": machine, "matmul_peak": peak, "source_run": common.relative(source),
                               "steps": args.steps,
                               "tokens_per_step": rows_out[0]["tokens"] / args.steps, "summary": summary,
                               "variants": rows_out, "profile_project": profiled},
                 {r["variant"]: r["tokens_per_s"] for r in rows_out}, "SFT tokens/s (higher is better)")


if __name__ == "__main__":
    main()
