"""The gateway's added latency: the same requests straight to a backend and through `aletheia gateway`, side by side
in one run, at 1 and 16 concurrent clients, streamed and not, with the output (PII) filter on (and off, to see what
the filter itself costs).

    .venv/bin/python benchmarks/gateway_latency.py [--backends fake,llama-server] [--clients 1,16] [--requests 96]

Two backends, each in its own process, started and stopped by this script:
- `fake`: a bare ASGI app under uvicorn that answers at once with a fixed 64-word answer (streamed one word per
  event, as llama-server streams one token per event; prose with two numbers in it, so the filter has work). No
  model time: what is left is the gateway's own cost, the worst case for its overhead.
- `llama-server`: llama.cpp's server on the embedded model's GGUF, greedy, `--max-tokens` tokens: the overhead as a
  client meets it.

Each cell (backend, streamed or not, clients) runs its requests in rounds that alternate direct → gateway with the
filter → gateway without it, so drift in the machine's load hits every path alike. A request's latency is the time
to its last byte, streamed ones also to the first token. Overhead = gateway − direct at p50 and p95. Each gateway
process's CPU time per request is recorded too: on a shared machine it moves far less than latency does. The gateways
run with `aletheia gateway`'s defaults (rate limit raised so it never refuses), from the project root (`python -m`
imports the package from the working folder). `--baseline-src DIR` adds a gateway from another copy of the package
(`git archive REV aletheia_utils | tar -x -C DIR`), to compare two versions in one run; `--baseline-rev REV` does
that extraction itself. Each cell's `cpu_ratio_vs_baseline` is a gateway's CPU per request over the baseline's (same
filter, pii): below 1, the change saves CPU. Writes benchmarks/results/gateway_latency.{json,png}.

The wall-clock run against llama-server on a quiet machine, old against new, is one command:

    .venv/bin/python benchmarks/gateway_latency.py --backends llama-server --baseline-rev 1b044cc --filters pii
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time

ANSWER = ("A mutex lets one thread at a time enter a critical section, so two threads never update the same data "
          "at once. A thread that finds the mutex held waits until the holder releases it; on Linux 2.6 and later a "
          "futex parks the waiting thread instead of spinning, which saves CPU time when the section takes over 10 "
          "microseconds. Keep critical sections short, release the mutex on every path out of them, and take "
          "several mutexes in one fixed order so that two threads never deadlock.").split()[:64]
PROMPTS = ["What does fsync do?", "Why use a mutex?", "What is a database index?", "How does DNS resolve a name?",
           "What is a race condition?", "Explain TCP slow start.", "What does a load balancer do?",
           "Why are hash tables fast?"]
KEY = "bench-key"


# ---------------------------------------------------------------- the fake backend (its own process)

async def fake_backend(scope, receive, send):
    """llama-server's answers without a model: /health, and chat completions streamed one word per event or whole."""
    if scope["type"] != "http":
        return
    if scope["path"].endswith("/health"):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        return await send({"type": "http.response.body", "body": b'{"status":"ok"}'})
    raw, more = b"", True
    while more:
        message = await receive()
        raw, more = raw + message.get("body", b""), message.get("more_body", False)
    body = json.loads(raw)
    head = {"id": "chatcmpl-fake", "created": 0, "model": body.get("model")}
    usage = {"prompt_tokens": 12, "completion_tokens": len(ANSWER), "total_tokens": 12 + len(ANSWER)}
    if not body.get("stream"):
        answer = {**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": " ".join(ANSWER)}}]}
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        return await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    chunk = {**head, "object": "chat.completion.chunk"}
    words = [w if i == 0 else " " + w for i, w in enumerate(ANSWER)]
    events = [{**chunk, "choices": [{"index": 0, "finish_reason": None, "delta": {"content": w}}]} for w in words]
    events.append({**chunk, "choices": [{"index": 0, "finish_reason": "stop", "delta": {}}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        events.append({**chunk, "choices": [], "usage": usage})
    for event in events:
        await send({"type": "http.response.body", "body": f"data: {json.dumps(event)}\n\n".encode(), "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def serve_fake(port: int) -> None:
    import uvicorn

    uvicorn.run(fake_backend, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


# ---------------------------------------------------------------- the client

async def one_request(client, url: str, key: str | None, body: dict) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    start, ttft = time.perf_counter(), None
    try:
        if not body["stream"]:
            resp = await client.post(url, json=body, headers=headers)
            ok = resp.status_code == 200 and bool(resp.json()["choices"][0]["message"]["content"])
            return {"ok": ok, "latency_s": time.perf_counter() - start, "status": resp.status_code}
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            done = False
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    done = True
                    break
                if ttft is None and any((c.get("delta") or {}).get("content") for c in json.loads(payload)["choices"]):
                    ttft = time.perf_counter() - start
            return {"ok": resp.status_code == 200 and done and ttft is not None, "status": resp.status_code,
                    "latency_s": time.perf_counter() - start, "ttft_s": ttft}
    except Exception as e:  # noqa: BLE001 - counted as an error of this path
        return {"ok": False, "latency_s": time.perf_counter() - start, "error": repr(e)[:200]}


async def run_batch(client, url: str, key: str | None, bodies: list[dict], clients: int) -> list[dict]:
    """`bodies` sent by `clients` concurrent workers (each one request at a time)."""
    queue, out = list(bodies), []

    async def worker():
        while queue:
            out.append(await one_request(client, url, key, queue.pop()))
    await asyncio.gather(*(worker() for _ in range(clients)))
    return out


def _pct(values: list[float], q: float) -> float | None:
    import numpy as np

    return float(np.percentile(values, q)) if values else None


def stats(results: list[dict]) -> dict:
    ok = [r for r in results if r["ok"]]
    lat, ttft = [r["latency_s"] for r in ok], [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    return {"requests": len(results), "errors": len(results) - len(ok),
            "error_examples": [r.get("error") or r.get("status") for r in results if not r["ok"]][:3],
            "p50_ms": _ms(_pct(lat, 50)), "p95_ms": _ms(_pct(lat, 95)),
            "mean_ms": _ms(sum(lat) / len(lat) if lat else None),
            "ttft_p50_ms": _ms(_pct(ttft, 50)), "ttft_p95_ms": _ms(_pct(ttft, 95))}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads), from /proc: unlike latency, barely moved by
    other programs sharing the cores."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


async def measure_cell(paths: dict[str, tuple[str, str | None, str]], stream: bool, clients: int, requests: int,
                       max_tokens: int, warmup: int) -> dict[str, list[dict]]:
    """Every path answers `requests` requests at `clients` concurrency, in alternating rounds of 2×clients."""
    import httpx

    results: dict[str, list[dict]] = {name: [] for name in paths}
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        def bodies(n, offset):
            return [{"messages": [{"role": "user", "content": PROMPTS[(offset + i) % len(PROMPTS)]}],
                     "max_tokens": max_tokens, "temperature": 0, "stream": stream} for i in range(n)]
        for url, key, model in paths.values():
            await run_batch(client, url, key, [{**b, "model": model} for b in bodies(warmup, 0)], clients)
        size, done, turn = 2 * clients, 0, 0
        while done < requests:
            n = min(size, requests - done)
            order = list(paths)[turn % len(paths):] + list(paths)[:turn % len(paths)]
            for name in order:
                url, key, model = paths[name]
                results[name] += await run_batch(client, url, key, [{**b, "model": model} for b in bodies(n, done)],
                                                 clients)
            done, turn = done + n, turn + 1
    return results


# ---------------------------------------------------------------- main

def figure(rows: list[dict]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = [r for r in rows if r["path"] != "direct"]
    labels = sorted({(r["backend"], r["stream"], r["clients"]) for r in cells},
                    key=lambda c: (c[0], c[1], c[2]))
    paths = sorted({r["path"] for r in cells})
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.8 * len(labels) + 1.8), sharey=True)
    y = np.arange(len(labels))
    for ax, stat in zip(axes, ("p50", "p95"), strict=True):
        step = 0.8 / len(paths)
        for k, path in enumerate(paths):
            values = [next((r[f"overhead_{stat}_ms"] for r in cells if r["path"] == path
                            and (r["backend"], r["stream"], r["clients"]) == c), np.nan) for c in labels]
            ys = y + (k - (len(paths) - 1) / 2) * step
            ax.barh(ys, values, height=step * 0.95, label=path)
            for yy, v in zip(ys, values, strict=True):
                if not np.isnan(v):
                    ax.text(v, yy, f" {v:.1f}", va="center", fontsize=7)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_xscale("symlog", linthresh=10)  # milliseconds and seconds on one axis
        ax.set_xlabel(f"{stat}: gateway − direct (ms; log above 10)")
        ax.set_yticks(y, [f"{b}, {'stream' if s else 'whole'}, {c} client{'s' * (c > 1)}" for b, s, c in labels])
    axes[0].axvline(5, color="red", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.suptitle("Gateway overhead vs the backend called directly (to the last byte)", fontsize=10)
    fig.tight_layout()
    return fig


@contextlib.contextmanager
def launch_baseline(au, src: str, backend):
    """`aletheia gateway` importing the package from `src` (run from there, so `python -m` finds that copy first),
    with a config of keys every version knows and the default output filter (pii)."""
    import tempfile

    import yaml

    port = au.serve.free_port()
    config = tempfile.mkstemp(prefix="gateway-baseline-", suffix=".yaml")[1]
    with open(config, "w", encoding="utf-8") as f:
        yaml.safe_dump({"port": port, "model": "aletheia", "rate_limit": "1000000/minute",
                        "backends": [{"url": backend.base_url, "model": backend.model}]}, f)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(src), "ALETHEIA_GATEWAY_KEYS": KEY}
    with contextlib.ExitStack() as stack:
        with contextlib.chdir(src):  # the process starts (and is waited for) in `src`
            server = stack.enter_context(au.serve.launch(
                "gateway-baseline", [sys.executable, "-m", "aletheia_utils.cli", "gateway", "--config", config],
                host="127.0.0.1", port=port, model="aletheia", api_key=KEY, env=env))
        yield server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="fake,llama-server")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--requests", type=int, default=96, help="per path and cell (fake backend)")
    parser.add_argument("--llama-requests", type=int, default=32, help="per path and cell (llama-server)")
    parser.add_argument("--max-tokens", type=int, default=32, help="llama-server's answer length")
    parser.add_argument("--filters", default="pii,none", help="gateways to compare, by output_filter")
    parser.add_argument("--threads", type=int, default=1, help="llama-server's threads")
    parser.add_argument("--baseline-src", help="a folder holding another aletheia_utils (e.g. `git archive REV "
                        "aletheia_utils | tar -x -C DIR`) whose gateway, filter pii, runs beside the others")
    parser.add_argument("--baseline-rev", help="a git revision whose aletheia_utils becomes --baseline-src")
    parser.add_argument("--baseline-label", default="baseline", help="its name in the results")
    parser.add_argument("--name", default="gateway_latency")
    parser.add_argument("--note", default="shared machine: other engineers' jobs ran on the same 2 cores; this "
                        "benchmark ran at nice 19", help="what the results should say about the machine")
    parser.add_argument("--fake-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fake_backend:
        return serve_fake(args.fake_backend)

    import common

    import aletheia_utils as au
    from aletheia_utils import gateway as gw

    if args.baseline_rev:
        import subprocess
        import tempfile

        args.baseline_src = tempfile.mkdtemp(prefix="gateway-baseline-")
        archive = subprocess.run(["git", "archive", args.baseline_rev, "aletheia_utils"], cwd=common.ROOT,
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", args.baseline_src], input=archive, check=True)
        args.baseline_label = f"{args.baseline_label} ({args.baseline_rev})"

    clients = [int(c) for c in args.clients.split(",")]
    machine = common.machine()
    rows, started = [], time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for backend_kind in args.backends.split(","):
        with contextlib.ExitStack() as stack:
            if backend_kind == "fake":
                port = au.serve.free_port()
                backend = stack.enter_context(au.serve.launch(
                    "fake-backend", [sys.executable, os.path.abspath(__file__), "--fake-backend", str(port)],
                    host="127.0.0.1", port=port, model="fake", api_key=None))
                requests = args.requests
            else:
                gguf = au.models.embedded_gguf("smollm2-135m-instruct")
                backend = stack.enter_context(au.serve.llama_server(gguf, parallel=max(clients), ctx_size=512,
                                                                    threads=args.threads))
                requests = args.llama_requests
            paths = {"direct": (backend.base_url + "/chat/completions", backend.api_key, backend.model)}
            pids = {"direct": backend.process.pid}  # the process whose CPU time each path adds
            for spec in args.filters.split(","):
                cfg = gw.GatewayConfig(port=au.serve.free_port(), model="aletheia", rate_limit="1000000/minute",
                                       output_filter=spec, backends=[{"url": backend.base_url, "model": backend.model}])
                g = stack.enter_context(gw.launch(cfg, [KEY]))
                paths[f"gateway, filter {spec}"] = (g.base_url + "/chat/completions", KEY, "aletheia")
                pids[f"gateway, filter {spec}"] = g.process.pid
            if args.baseline_src:
                g = stack.enter_context(launch_baseline(au, args.baseline_src, backend))
                paths[f"gateway {args.baseline_label}, filter pii"] = (g.base_url + "/chat/completions", KEY,
                                                                       "aletheia")
                pids[f"gateway {args.baseline_label}, filter pii"] = g.process.pid
            for stream in (False, True):
                for n in clients:
                    load = list(os.getloadavg())
                    t0, cpu0 = time.perf_counter(), {k: cpu_seconds(pid) for k, pid in pids.items()}
                    results = asyncio.run(measure_cell(paths, stream, n, requests, args.max_tokens, warmup=2 * n))
                    cpu = {k: cpu_seconds(pid) - cpu0[k] for k, pid in pids.items()}
                    direct = stats(results["direct"])
                    for name, res in results.items():
                        s = stats(res)
                        row = {"backend": backend_kind, "stream": stream, "clients": n, "path": name, **s,
                               # the backend serves every path: its CPU per request counts them all
                               "process_cpu_ms_per_request": round(cpu[name] * 1000 / (
                                   (requests + 2 * n) * (len(paths) if name == "direct" else 1)), 2),
                               "load_average_before": load, "cell_wall_s": round(time.perf_counter() - t0, 1)}
                        if name != "direct":
                            for k in ("p50", "p95", "ttft_p50", "ttft_p95"):
                                a, b = s[f"{k}_ms"], direct[f"{k}_ms"]
                                row[f"overhead_{k}_ms"] = None if a is None or b is None else round(a - b, 2)
                        rows.append(row)
                    base = next((r for r in rows[-len(results):] if r["path"].startswith("gateway ")
                                 and r["path"].endswith("filter pii") and args.baseline_src), None)
                    for row in rows[-len(results):]:
                        if base and row["path"].startswith("gateway, filter pii"):
                            row["cpu_ratio_vs_baseline"] = round(row["process_cpu_ms_per_request"]
                                                                 / base["process_cpu_ms_per_request"], 3)
                        common.shown(row)
                    save(args, machine, started, rows, complete=False)
    save(args, machine, started, rows, complete=True)


def save(args, machine: dict, started: str, rows: list[dict], complete: bool) -> None:
    """The results so far (after every cell, so a run stopped early keeps what it measured)."""
    import common

    summary = {f"{r['backend']}, {'stream' if r['stream'] else 'whole'}, {r['clients']} clients, {r['path']}":
               {k: r.get(k) for k in ("overhead_p50_ms", "overhead_p95_ms", "overhead_ttft_p50_ms", "p50_ms",
                                      "process_cpu_ms_per_request", "cpu_ratio_vs_baseline", "errors")}
               for r in rows if r["path"] != "direct"}
    if complete:
        print(json.dumps(summary, indent=1))
    common.write(args.name, {
        "started": started, "complete": complete, "command": " ".join(sys.argv), "machine": machine,
        "nice": os.nice(0), "note": args.note,
        "answer_words_fake": len(ANSWER), "max_tokens_llama_server": args.max_tokens, "threads": args.threads,
        "requests_per_path_and_cell": {"fake": args.requests, "llama-server": args.llama_requests},
        "baseline": ({"src": common.relative(args.baseline_src), "label": args.baseline_label}
                     if args.baseline_src else None),
        "summary": summary, "results": rows}, {}, "", figure=figure(rows))

if __name__ == "__main__":
    main()
