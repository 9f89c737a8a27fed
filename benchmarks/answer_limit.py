"""How many answers end on their own within each token limit, on the VALIDATION split: the base model and a finished
run's merged DPO model answer the same prompts as 08 does (llama-server, greedy, `eval.generation.sampling`) with the
largest limit, and each smaller limit is read off the same answers (greedy decoding with a penalty over earlier tokens
writes the same first tokens whatever the limit). Tells an answer that is long from one that never ends.

    .venv/bin/python benchmarks/answer_limit.py [--run-dir runs/default-check] [--limits 320,480,640]

Per model and limit: answers that ended within it, and the median length of the answers that ended; per model, the
repeated 4-grams of the answers that did not end within the largest limit. Writes
benchmarks/results/answer_limit.{json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import common

import aletheia_utils as au


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=None, help="finished run: its sft_val prompts and 04_merge model")
    parser.add_argument("--limits", default="320,480,640", help="token limits, comma-separated")
    args = parser.parse_args()
    source = common.source_run(args.run_dir)
    limits = sorted(int(x) for x in args.limits.split(","))
    machine = common.machine()
    cfg = au.config.load(common.ROOT / "params" / "default.yaml")
    prompts = [r["prompt"] for r in au.data.load_split(source / "01_curate" / "sft_val.jsonl", "sft")]
    models = {"base": Path(au.models.resolve(cfg.run.base_model)), "dpo": source / "04_merge" / "model"}
    rows = {}
    with tempfile.TemporaryDirectory(prefix="answer-limit-") as tmp:
        for name, folder in models.items():
            with au.gguf.served_f16(folder, name=name, workdir=tmp, parallel=cfg.serve.parallel,
                                    ctx_size=cfg.serve.max_model_len, threads=au.pipeline.use_threads(cfg)) as server:
                answers = au.generation.server_answers(
                    server, prompts, max_new_tokens=limits[-1], sampling=cfg.eval.generation.sampling.model_dump(),
                    concurrency=cfg.serve.parallel, timeout=cfg.serve.request_timeout_s,
                    style=cfg.data.prompt_format)[0]
            if None in answers:
                raise SystemExit(f"{name}: {answers.count(None)} of {len(prompts)} requests failed")
            never = [a for a in answers if not a.ended]
            ended = {n: [a.tokens for a in answers if a.ended and a.tokens <= n] for n in limits}
            rows[name] = {
                "prompts": len(answers),
                "ended_within": {str(n): len(ended[n]) for n in limits},
                "median_ended_tokens": {str(n): statistics.median(ended[n] or [0]) for n in limits},
                "not_ended": len(never),
                "repeated_4grams_of_not_ended": statistics.mean(
                    [au.evaluate.repeated_ngrams(a.text) for a in never] or [0.0]),
                "repeated_4grams_all": statistics.mean(au.evaluate.repeated_ngrams(a.text) for a in answers)}
            print(name, rows[name], flush=True)
    common.write("answer_limit", {"machine": machine, "source_run": common.relative(source), "split": "sft_val",
                                  "limits": limits, "sampling": cfg.eval.generation.sampling.model_dump(),
                                  "models": rows},
                 {f"{m} ≤{n}": 100 * r["ended_within"][str(n)] / r["prompts"] for m, r in rows.items() for n in limits},
                 "answers that ended on their own, % (validation split)")


if __name__ == "__main__":
    main()
