"""The recipe sweep that chose `params/default.yaml`'s training and decoding settings, measured on the VALIDATION
split only (the eval split is 08's and never chooses anything).

    .venv/bin/python benchmarks/recipe.py --run-dir runs/recipe [--decoding NAME=JSON …] \
        [--variant 'sft.learning_rate=1e-3 sft.max_steps=60' …] [--dpo] [--dpo-variant 'dpo.rejected=policy' …] \
        [--name recipe]

The base model answers every validation prompt under each decoding (llama-server sampler fields, plus `temperature`
and `samples`: answers per prompt, seeds run.seed + j, metrics averaged per prompt; the decoding every model then
shares). Each `--variant` (params overrides, as `aletheia run --set`) trains 02's SFT from the run's curated data in a
scratch folder, then (with `--dpo`) 03's DPO on top, once per `--dpo-variant` on that same SFT model; each trained
model answers the same prompts under the same decodings. Per model: validation loss, ROUGE-L and embedding
similarity to the references, the share of answers that ended on their own, repeated 4-grams, length against the
reference, and the paired difference against the base with its bootstrap 95% interval. Results go to
benchmarks/results/<name>.json as each model finishes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex

import common
import torch

import aletheia_utils as au

KEYS = ("rouge_l", "embed_sim", "ended", "repeated_4grams", "length_ratio")


def scored(model_dir, cfg, prompts, references, embed, decodings) -> dict:
    """Answers of one model (an HF folder, served as an F16 GGUF by llama-server's slots: the fast path on a CPU)
    under each decoding (llama-server sampler fields), scored; per-prompt metrics kept for the paired differences."""
    out = {}
    with au.gguf.served_f16(model_dir, parallel=8, ctx_size=1024, threads=au.pipeline.use_threads(cfg)) as server:
        for name, spec in decodings.items():
            sampling = {k: v for k, v in spec.items() if k not in ("temperature", "samples")}
            with common.Timer() as t:
                runs = au.generation.server_answers(
                    server, prompts, concurrency=8, sampling=sampling, temperature=spec.get("temperature", 0.0),
                    samples=spec.get("samples", 1), seed=cfg.run.seed, style=cfg.data.prompt_format,
                    max_new_tokens=cfg.eval.generation.max_new_tokens)
            per_sample = [au.evaluate.answer_metrics(run, references, embed) for run in runs]  # each kept in the JSON
            per = au.evaluate.sample_mean(per_sample)
            out[name] = {"summary": au.evaluate.summarize(per), "per_prompt": per, "generate_s": round(t.s, 1),
                         "per_sample": {k: [[m and round(m[k], 4) for m in run] for run in per_sample]
                                        for k in au.evaluate.VERDICT_METRICS},
                         "examples": [a.text[:400] for a in runs[0][:2] if a is not None]}
            print(f"  {name}: " + ", ".join(f"{k} {out[name]['summary'][k]:.3f}" for k in KEYS)
                  + f" ({t.s:.0f} s)", flush=True)
    return out


def train(stage: str, cfg, root) -> tuple:
    """02's (or 03's) trainer from the params, fitted with no periodic checkpoints; returns (trainer, validation
    metrics at the last step, training seconds)."""
    from transformers.trainer_utils import SaveStrategy

    torch.manual_seed(cfg.run.seed)
    paths = au.pipeline.RunPaths.for_run(cfg, root)
    build = au.sft.build_trainer if stage == "02_sft" else au.dpo.build_trainer
    trainer, _ = build(cfg, paths)
    trainer.args.save_strategy = SaveStrategy.NO
    with common.Timer() as t:
        trainer.train()
    metrics = au.training.final_evaluation(trainer)
    au.training.save_adapter(trainer, trainer.processing_class, paths.stage(stage) / "adapter")
    return trainer, {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}, round(t.s, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a run with 01_curate done (default runs/default-check)")
    parser.add_argument("--params", default=str(common.ROOT / "params" / "default.yaml"))
    parser.add_argument("--decoding", action="append", default=[],
                        help='NAME=JSON of llama-server sampler fields (+ temperature, samples), e.g. '
                             't07x4=\'{"repeat_penalty": 1.1, "temperature": 0.7, "samples": 4}\' '
                             "(default: the params' eval.generation)")
    parser.add_argument("--variant", action="append", default=[], help="params overrides, space-separated")
    parser.add_argument("--dpo", action="store_true", help="also train 03's DPO on each SFT variant")
    parser.add_argument("--dpo-variant", action="append", default=[],
                        help="DPO-only overrides, each trained on the same SFT model (implies --dpo)")
    parser.add_argument("--limit", type=int, help="validation prompts answered (default all)")
    parser.add_argument("--name", default="recipe")
    args = parser.parse_args()
    source = common.source_run(args.run_dir).resolve()
    cfg = au.config.load(args.params)
    g = cfg.eval.generation
    decodings = dict((d.split("=", 1)[0], json.loads(d.split("=", 1)[1])) for d in args.decoding) or {
        "params": {**g.sampling.model_dump(), "temperature": g.temperature, "samples": g.samples}}
    au.pipeline.use_threads(cfg)
    rows = au.data.load_split(source / "01_curate" / "sft_val.jsonl", "sft")[:args.limit]
    prompts, references = [r["prompt"] for r in rows], [r["response"] for r in rows]
    embed = au.embed.Embedder()
    result = {"machine": common.machine(), "source_run": os.path.relpath(source, common.ROOT), "prompts": len(prompts),
              "split": "sft_val",
              "max_new_tokens": cfg.eval.generation.max_new_tokens, "decodings": decodings, "models": {}}

    def save() -> None:
        last = list(decodings)[-1]
        common.write(args.name, result, {m: r["scores"][last]["summary"]["rouge_l"]
                                         for m, r in result["models"].items()}, f"ROUGE-L ({last})")

    print("base", flush=True)
    base = scored(au.models.resolve(cfg.run.base_model), cfg, prompts, references, embed, decodings)
    result["models"]["base"] = {"scores": base}
    save()
    dpo_specs = args.dpo_variant or ([""] if args.dpo else [])
    for spec in args.variant:
        with common.scratch_run(source, "01_curate") as root:
            for stage, extra in [("02_sft", "")] + [("03_dpo", d) for d in dpo_specs]:
                vcfg = au.config.load(args.params, shlex.split(f"{spec} {extra}"))
                label = f"{stage[3:]}[{spec}{' | ' + extra if extra else ''}]"
                print(label, flush=True)
                trainer, val, seconds = train(stage, vcfg, root)
                del trainer
                gc.collect()
                model, tok = au.merge.load_adapter_model(vcfg.run.base_model, root / stage / "adapter")
                merged = au.merge.save_merged(model, tok, root / stage / "merged")  # as 04_merge does
                res = scored(merged, vcfg, prompts, references, embed, decodings)
                result["models"][label] = {"overrides": f"{spec} {extra}".strip(), "validation": val,
                                           "train_s": seconds, "scores": res,
                                           "vs_base": {d: au.evaluate.paired_differences(
                                               r["per_prompt"], base[d]["per_prompt"], KEYS,
                                               cfg.eval.bootstrap_samples, cfg.run.seed) for d, r in res.items()}}
                print(f"  validation {val}, train {seconds:.0f} s", flush=True)
                print(f"  vs base {result['models'][label]['vs_base']}", flush=True)
                save()
    for r in result["models"].values():  # per-prompt rows are for the paired differences, not the JSON
        for s in r["scores"].values():
            s.pop("per_prompt")
    save()


if __name__ == "__main__":
    main()
