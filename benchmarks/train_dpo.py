"""DPO pairs/s, side by side in one run: TRL's `DPOTrainer` with stock settings vs the project's 03_dpo path
(`au.dpo.build_trainer`), and that path with TRL's own LM head kept (`project_trl_head`), all starting from the same
SFT adapter on the same pairs.

    .venv/bin/python benchmarks/train_dpo.py [--pairs 24] [--val-pairs 8] [--run-dir runs/default-check]

Each variant runs the stage as 03_dpo does: build the trainer, evaluate the held-out pairs, train one epoch,
evaluate again. pairs/s is the training pairs over build + train time (building includes the project's one
reference pass); the held-out results after training are compared. Each variant's model FLOP/s over the same time
(`model_flops`) is set against the machine's matmul peak, measured at the start of the run
(`common.matmul_peak`). Writes benchmarks/results/train_dpo.{json,png}.
"""

from __future__ import annotations

import argparse
import tempfile

import common
import flops
import torch

import aletheia_utils as au


def stock_trainer(cfg, source, rows, val_rows):
    """`DPOTrainer` as its docs show it for a PEFT policy: the fp32 checkpoint with the SFT adapter loaded
    trainable, no `ref_model`, default `DPOConfig` except for the optimization settings (the project's values; the
    default micro-batch of 8, capped at the project's effective batch, with accumulation making up the rest)."""
    from datasets import Dataset
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    d = cfg.dpo
    micro, accumulation = common.stock_batches(d.per_device_batch_size, d.gradient_accumulation_steps)
    model, tok = au.training.load_base(cfg.run.base_model)
    model = PeftModel.from_pretrained(model, str(source / "02_sft" / "adapter"), is_trainable=True)
    args = DPOConfig(output_dir=tempfile.mkdtemp(prefix="stock-dpo-"), use_cpu=True, report_to="none",
                     per_device_train_batch_size=micro, per_device_eval_batch_size=micro,
                     gradient_accumulation_steps=accumulation, learning_rate=d.learning_rate,
                     lr_scheduler_type=d.lr_scheduler, warmup_steps=d.warmup_ratio, weight_decay=d.weight_decay,
                     num_train_epochs=1, logging_steps=1, save_strategy="no", seed=cfg.run.seed, data_seed=cfg.run.seed,
                     beta=d.beta, max_length=d.max_seq_length)
    style = cfg.data.prompt_format
    return DPOTrainer(model=model, ref_model=None, args=args, processing_class=tok,
                      train_dataset=Dataset.from_list(au.dpo.records(rows, style)),
                      eval_dataset=Dataset.from_list(au.dpo.records(val_rows, style)))


def project_trainer(cfg, run_root, plain_head: bool = True):
    """03's trainer; with `plain_head=False` it keeps TRL's own chunked LM head (the one lever switched off)."""
    cls = au.dpo.CrashSafeDPOTrainer
    if not plain_head:
        au.dpo.CrashSafeDPOTrainer = type("TRLHeadDPOTrainer", (cls,), {"use_plain_head": lambda self: None})
    try:
        trainer, _ = au.dpo.build_trainer(cfg, au.pipeline.RunPaths.for_run(cfg, run_root))
    finally:
        au.dpo.CrashSafeDPOTrainer = cls
    return trainer


def model_flops(trainer) -> dict:
    """The model FLOPs of what pairs/s times (build + train, `flops.pair_flops`): the policy's forward and backward on
    every training pair's chosen and rejected sequences, and one reference forward of each training pair, in
    training (stock) or in the build (`precompute_ref_log_probs`: the project), whose build also runs the reference
    forward of the held-out pairs that both evaluations then reuse. Logits of the answer tokens only, no padding."""
    config, lora, length = trainer.model.config, flops.trainable_params(trainer.model), trainer.args.max_length
    policy = flops.pair_flops(config, lora, trainer.train_dataset, length, backward=True)
    reference = flops.pair_flops(config, lora, trainer.train_dataset, length, backward=False)
    if trainer.args.precompute_ref_log_probs and trainer.eval_dataset is not None:
        reference += flops.pair_flops(config, lora, trainer.eval_dataset, length, backward=False)
    return {"lora_params": lora, "policy_flops": policy, "reference_flops": reference, "flops": policy + reference}


def measure(name: str, build, n_pairs: int, n_val: int, peak: dict) -> dict:
    """Build, evaluate, train, evaluate as 03 does; pairs/s and model FLOP/s (against the machine's matmul `peak`)
    over build + train time."""
    torch.manual_seed(0)
    load = list(common.os.getloadavg())
    with common.Timer() as built:
        trainer = build()
    with common.Timer() as before:
        val_before = trainer.evaluate()
    with common.Timer() as trained:
        output = trainer.train()
    with common.Timer() as after:
        val_after = trainer.evaluate()
    steps = [h for h in trainer.state.log_history if "loss" in h and "train_loss" not in h]
    counted = model_flops(trainer)
    precision = "bf16" if trainer.args.bf16 else "fp32"
    row = {"variant": name, "micro_batch": trainer.args.per_device_train_batch_size,
           "gradient_accumulation": trainer.args.gradient_accumulation_steps,
           "cpu_s": built.cpu_s + before.cpu_s + trained.cpu_s + after.cpu_s, "build_s": built.s,
           "eval_before_s": before.s, "train_s": trained.s, "eval_after_s": after.s,
           "stage_s": built.s + before.s + trained.s + after.s, "pairs": n_pairs, "val_pairs": n_val,
           "pairs_per_s": n_pairs / (built.s + trained.s),
           "pairs_per_cpu_s": n_pairs / (built.cpu_s + trained.cpu_s),
           "eval_pairs_per_s": 2 * n_val / (before.s + after.s),
           "steps": trainer.state.global_step, "loss_per_step": [h["loss"] for h in steps],
           "train_loss": output.training_loss, "val_loss_before": val_before["eval_loss"],
           "val_loss_after": val_after["eval_loss"], "val_accuracy_after": val_after["eval_rewards/accuracies"],
           "val_margin_after": val_after["eval_rewards/margins"], "precision": precision,
           **common.against_peak(counted.pop("flops"), built.s + trained.s, peak, precision), **counted,
           "load_average_before": load}
    print(f"{name}: {row['pairs_per_s']:.3f} pairs/s, {row['model_flops_per_s'] / 1e9:.1f} model GFLOP/s, "
          f"{row['fraction_of_peak']:.1%} of the matmul peak", flush=True)
    return common.shown(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=24, help="training pairs (one epoch)")
    parser.add_argument("--val-pairs", type=int, default=8, help="held-out pairs evaluated before and after")
    parser.add_argument("--run-dir", default=None, help="finished run whose 01_curate pairs and SFT adapter are used")
    parser.add_argument("--variants", default="stock,project_trl_head,project")
    parser.add_argument("--name", default="train_dpo", help="results/<name>.json and .png")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--profile", action="store_true", help="then profile the project's training once more")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    source = common.source_run(args.run_dir)
    machine = common.machine()
    peak = common.matmul_peak()  # at the thread count training runs with
    cfg = au.config.load(common.ROOT / "params" / "default.yaml", {
        "dpo.max_steps": -1, "dpo.num_epochs": 1, "dpo.logging_steps": 1, "dpo.eval_steps": 10**6,
        "dpo.save_steps": 10**6, "dpo.rejected": "curated"})  # every variant trains on exactly the same pairs
    _, tok = au.training.load_base(cfg.run.base_model)
    fit = lambda name, n: au.dpo.fit_pairs(au.data.load_split(source / "01_curate" / name, "dpo"), tok,  # noqa: E731
                                          cfg.data.prompt_format, cfg.dpo.max_seq_length, cfg.dpo.overlong)[0][:n]
    rows, val_rows = fit("dpo.jsonl", args.pairs), fit("dpo_val.jsonl", args.val_pairs)
    results, profiled = [], None
    with common.scratch_run(source, "02_sft") as run_root:
        data = run_root / "01_curate"  # the project path reads exactly these pairs
        data.mkdir()
        au.data.write_jsonl(data / "dpo.jsonl", rows)
        au.data.write_jsonl(data / "dpo_val.jsonl", val_rows)
        builders = {"stock": lambda: stock_trainer(cfg, source, rows, val_rows),
                    "project": lambda: project_trainer(cfg, run_root),
                    "project_trl_head": lambda: project_trainer(cfg, run_root, plain_head=False)}
        for name in args.variants.split(","):
            results.append(measure(name, builders[name], len(rows), len(val_rows), peak))
        if args.profile:
            profiled = common.profile(project_trainer(cfg, run_root).train)
    base = results[0]
    for r in results:
        r["speedup_vs_" + base["variant"]] = r["pairs_per_s"] / base["pairs_per_s"]
        r["stage_speedup_vs_" + base["variant"]] = base["stage_s"] / r["stage_s"]
        r["cpu_speedup_vs_" + base["variant"]] = r["pairs_per_cpu_s"] / base["pairs_per_cpu_s"]
    summary = {r["variant"]: {k: round(r[k], 4) for k in ("pairs_per_s", "stage_s", "train_loss", "val_loss_after",
                                                         "val_accuracy_after", "val_margin_after",
                                                         "fraction_of_peak")}
               | {"model_gflops_per_s": round(r["model_flops_per_s"] / 1e9, 1)}
               | {"speedup": round(r["speedup_vs_" + base["variant"]], 2),
                  "stage_speedup": round(r["stage_speedup_vs_" + base["variant"]], 2),
                  "cpu_time_speedup": round(r["cpu_speedup_vs_" + base["variant"]], 2)} for r in results}
    print(summary)
    common.write(args.name, {"machine": machine, "matmul_peak": peak, "source_run": common.relative(source),
                               "summary": summary,
                               "variants": results, "profile_project": profiled},
                 {r["variant"]: r["pairs_per_s"] for r in results}, "DPO pairs/s (higher is better)")


if __name__ == "__main__":
    main()
