"""Serving throughput and latency at 1, 4 and 8 concurrent clients, side by side in one run: the project's CPU
server (llama.cpp's `llama-server`, one slot per client, continuous batching — 07_serve_cpu) versus
llama-cpp-python's stock server (`python -m llama_cpp.server`), on the same GGUF, prompts and token budget.

    .venv/bin/python benchmarks/serving.py [--run-dir runs/default-check] [--clients 1,4,8] [--max-tokens 64]

Every request is a streamed greedy chat completion through the `openai` client (`au.serve.load_test`); each server
gets one warm-up request first. The stock server runs with `--interrupt_requests=false`: with its default a new
request cuts the running stream short, which the load test counts as an error. Writes
benchmarks/results/serving.{json,png}.
"""

from __future__ import annotations

import argparse
import os

import common

import aletheia_utils as au


def measure(name: str, start, prompts: list[str], clients: list[int], per_client: int, max_tokens: int) -> list[dict]:
    with start() as server:
        au.serve.load_test(server, prompts[:1], concurrency=1, requests=1, max_tokens=8)
        rows = []
        for n in clients:
            row = au.serve.load_test(server, prompts, concurrency=n, requests=n * per_client, max_tokens=max_tokens,
                                     timeout=600)
            rows.append(common.shown({**row, "server": name}))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=None, help="finished run whose held-out prompts (and 06_gguf) are used")
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of both servers")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    run = common.source_run(args.run_dir)
    cfg = au.config.load(common.ROOT / "params" / "default.yaml")
    gguf, gguf_kind = common.pick_gguf(run, cfg)
    prompts = [r["prompt"] for r in au.data.load_split(run / "01_curate" / "eval.jsonl", "sft")]
    machine = common.machine()
    servers = {
        "llama-cpp-python server (stock)": lambda: au.serve.llama_cpp_python_server(gguf, threads=args.threads),
        "llama-server (project)": lambda: au.serve.llama_server(gguf, parallel=max(clients), threads=args.threads),
    }
    rows = [r for name, start in servers.items()
            for r in measure(name, start, prompts, clients, args.requests_per_client, args.max_tokens)]
    stock, project = list(servers)
    summary = {}
    for n in clients:
        a, b = (next(r for r in rows if r["server"] == s and r["concurrency"] == n) for s in (stock, project))
        summary[f"{n} clients"] = {
            "stock_tokens_per_s": round(a["output_tokens_per_s"], 2),
            "project_tokens_per_s": round(b["output_tokens_per_s"], 2),
            "throughput_ratio": round(b["output_tokens_per_s"] / a["output_tokens_per_s"], 2),
            "stock_p50_s": round(a["latency_p50_s"], 2), "project_p50_s": round(b["latency_p50_s"], 2),
            "stock_p95_s": round(a["latency_p95_s"], 2), "project_p95_s": round(b["latency_p95_s"], 2),
            "errors": [a["error_rate"], b["error_rate"]]}
    print(summary)
    common.write("serving", {"machine": machine, "gguf": common.relative(gguf), "gguf_kind": gguf_kind,
                             "threads": args.threads,
                             "max_tokens": args.max_tokens, "requests_per_client": args.requests_per_client,
                             "summary": summary, "results": rows},
                 {}, "", figure=au.plots.throughput_vs_concurrency(rows))


if __name__ == "__main__":
    main()
