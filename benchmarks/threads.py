"""Threads per engine: every engine the pipeline drives, running the same work at each thread count, side by side in
one run — what `run.threads` (one knob for all of them) should default to.

    .venv/bin/python benchmarks/threads.py [--run-dir runs/default-check] [--threads 1,2] [--rounds 2]

Engines and their work (a finished run's files): torch training (02's SFT path, `--sft-steps` optimizer steps,
tokens/s), torch generation (08's `generation.hf_answers` on the merged model, 8 eval prompts × 64 new tokens,
tokens/s), llama-server (01, 03, 07 and 08: 4 clients × 2 requests × 64 tokens, output tokens/s), llama-cpp-python
scoring (06's `gguf.measure_gguf` on 8 eval probes, tokens/s), llama-quantize (06's `gguf.quantize`, F16 → Q4_K_M,
the written file's check included, seconds) and llama-imatrix (06: 16 chunks of 256 tokens, seconds). Each round
measures every engine at every thread count, the order of the counts reversed every other round; the figure of a
count is the mean over rounds. Writes benchmarks/results/threads.{json,png}.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import common
import torch
import train_sft

import aletheia_utils as au


def sft_steps(cfg, run_root: Path, steps: int) -> dict:
    short = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"max_steps": steps, "logging_steps": 1})})
    trainer = train_sft.project_trainer(short, run_root)
    with common.Timer() as t:
        trainer.train()
    tokens = trainer.state.num_input_tokens_seen
    return {"work": f"{steps} SFT steps, {tokens} tokens", "s": t.s, "rate": tokens / t.s, "unit": "tokens/s"}


def hf_generation(model, tokenizer, prompts: list[str], style: str) -> dict:
    with common.Timer() as t:
        answers = au.generation.hf_answers(model, tokenizer, prompts, style, max_new_tokens=64, batch_size=8)
    tokens = sum(a.tokens for a in answers)
    return {"work": f"{len(prompts)} prompts, {tokens} new tokens", "s": t.s, "rate": tokens / t.s, "unit": "tokens/s"}


def llama_server(gguf: Path, prompts: list[str], threads: int) -> dict:
    with au.serve.llama_server(gguf, parallel=4, threads=threads) as server:
        au.serve.load_test(server, prompts[:1], concurrency=1, requests=1, max_tokens=8)
        row = au.serve.load_test(server, prompts, concurrency=4, requests=8, max_tokens=64, timeout=600)
    return {"work": "4 clients, 8 requests x 64 tokens", "s": row["wall_s"], "rate": row["output_tokens_per_s"],
            "unit": "output tokens/s", "errors": row["error_rate"]}


def gguf_scoring(gguf: Path, probes: list, threads: int) -> dict:
    with common.Timer() as t:
        au.gguf.measure_gguf(gguf, probes, threads=threads)
    tokens = sum(len(p.prompt) + len(p.response) + len(p.greedy) for p in probes)
    return {"work": f"{len(probes)} probes, {tokens} tokens", "s": t.s, "rate": tokens / t.s, "unit": "tokens/s"}


def tool(make, work: str) -> dict:
    with common.Timer() as t:
        make()
    return {"work": work, "s": t.s, "rate": 1 / t.s, "unit": "runs/s"}


def figure(summary: dict, counts: list[int]):
    """One group of bars per engine: each thread count's speed relative to the first count's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * len(summary)))
    height = 0.8 / len(counts)
    for i, n in enumerate(counts):
        values = [row[f"{n} threads"] / row[f"{counts[0]} threads"] for row in summary.values()]
        ax.barh([y + i * height for y in range(len(summary))], values, height,
                label=f"{n} thread{'s' if n > 1 else ''}")
    ax.set_yticks([y + height * (len(counts) - 1) / 2 for y in range(len(summary))], list(summary))
    ax.axvline(1, color="#999999", lw=0.8)
    ax.set_xlabel(f"speed relative to {counts[0]} thread{'s' if counts[0] > 1 else ''}")
    ax.set_xlim(0, 1.3 * max(row[f"{n} threads"] / row[f"{counts[0]} threads"] for row in summary.values()
                             for n in counts))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=None, help="finished run whose 01_curate, 04_merge and 06_gguf are used")
    parser.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sft-steps", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = common.source_run(args.run_dir)
    counts = [int(t) for t in args.threads.split(",")]
    machine = common.machine()
    cfg = au.config.load(common.ROOT / "params" / "default.yaml")
    style = cfg.data.prompt_format
    merged, gguf_dir = source / "04_merge" / "model", source / "06_gguf"
    f16 = au.gguf.gguf_path(gguf_dir, "F16")
    served = au.gguf.gguf_path(gguf_dir, cfg.gguf.serve_quant)
    eval_rows = au.data.load_split(source / "01_curate" / "eval.jsonl", "sft")[:8]
    prompts = [r["prompt"] for r in eval_rows]
    tokenizer = AutoTokenizer.from_pretrained(merged)
    precision = au.training.choose_precision(cfg.eval.precision)["precision"]
    model = AutoModelForCausalLM.from_pretrained(
        merged, dtype=torch.bfloat16 if precision == "bf16" else torch.float32).eval()
    probes = au.gguf.probes(model, tokenizer, eval_rows, style, cfg.gguf.agreement_tokens)
    for path in (f16, served):  # parsed once per process: not inside the first measurement
        au.gguf.read_metadata(path)
    results: dict[str, dict[int, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="threads-") as tmp, common.scratch_run(source, "01_curate") as run_root:
        tmp = Path(tmp)
        engines = {
            "torch training (02/03)": lambda n: sft_steps(cfg, run_root, args.sft_steps),
            "torch generation (08)": lambda n: hf_generation(model, tokenizer, prompts, style),
            "llama-server (01/03/07/08)": lambda n: llama_server(served, prompts, n),
            "llama-cpp-python scoring (06)": lambda n: gguf_scoring(f16, probes, n),
            "llama-quantize (06)": lambda n: tool(lambda: au.gguf.quantize(f16, tmp / "q.gguf", "Q4_K_M", n),
                                                  "F16 -> Q4_K_M"),
            "llama-imatrix (06)": lambda n: tool(lambda: au.gguf.importance_matrix(
                f16, gguf_dir / "calibration.txt", tmp / "imatrix.gguf", context=256, chunks=16, threads=n),
                "16 chunks x 256 tokens"),
        }
        for r in range(args.rounds):
            for name, run in engines.items():
                for n in counts if r % 2 == 0 else counts[::-1]:
                    torch.set_num_threads(n)
                    row = {"round": r, "threads": n, **run(n)}
                    results.setdefault(name, {}).setdefault(n, []).append(row)
                    print(name, {k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    torch.set_num_threads(max(counts))
    summary = {}
    for name, by_count in results.items():
        mean = {n: statistics.mean(r["rate"] for r in rows) for n, rows in by_count.items()}
        best = max(mean, key=mean.get)
        summary[name] = {"unit": by_count[counts[0]][0]["unit"],
                         **{f"{n} threads": round(v, 3) for n, v in mean.items()},
                         "faster": best, "ratio": round(mean[best] / min(mean.values()), 2)}
    for name, row in summary.items():
        print(f"{name}: {row}")
    common.write("threads", {"machine": machine, "source_run": common.relative(source), "threads": counts,
                             "rounds": args.rounds, "precision": precision, "summary": summary,
                             "results": results},
                 {}, "", figure=figure(summary, counts))


if __name__ == "__main__":
    main()
