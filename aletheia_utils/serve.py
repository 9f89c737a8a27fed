"""OpenAI-compatible servers started from Python, and the load test both serving notebooks share (07_serve_cpu).

Every server is a context manager: it refuses a port in use, waits for health, and always stops its
process group on exit, also when the body raises, so a failing notebook leaves no orphan behind.
Clients talk to servers only through the official `openai` package.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openai

from . import llamacpp


class ServerError(RuntimeError):
    """A server could not be started (bad model file, port in use, died or timed out during start-up)."""


@dataclass
class Server:
    """A running OpenAI-compatible server: `base_url` ends in `/v1`."""

    name: str
    base_url: str
    api_key: str | None
    model: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port_free(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ServerError(f"port {port} on {host} is already in use ({e.strerror})") from None


def check_gguf(path: str | os.PathLike) -> Path:
    """The path exists and starts with the GGUF magic; otherwise a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise ServerError(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ServerError(f"{path}: not a GGUF file (bad magic)")
    return path


def _stop(process: subprocess.Popen, grace_s: float = 10) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies (Linux), so a crashed kernel leaves no server."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _healthy(url: str, api_key: str | None) -> bool:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


@contextlib.contextmanager
def launch(name: str, cmd: Sequence[str], *, host: str, port: int, model: str, api_key: str | None,
           health_path: str = "/health", startup_timeout_s: float = 120, log_path: str | os.PathLike | None = None,
           env: dict[str, str] | None = None) -> Iterator[Server]:
    """Start `cmd` in its own process group, wait until `health_path` answers 200, stop it on exit."""
    check_port_free(host, port)
    log = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix=f"{name}-", suffix=".log")[1])
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        try:
            process = subprocess.Popen(list(map(str, cmd)), stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                       preexec_fn=_die_with_parent)
        except FileNotFoundError:
            raise ServerError(f"{name}: program {cmd[0]} is not installed") from None
    server = Server(name, f"http://{host}:{port}/v1", api_key, model, process, log)
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(f"http://{host}:{port}{health_path}", api_key):
            if process.poll() is not None:
                raise ServerError(f"{name} exited with code {process.returncode} during start-up; "
                                  f"last lines of {log}:\n{server.log_tail()}")
            if time.monotonic() > deadline:
                raise ServerError(f"{name} did not become healthy within {startup_timeout_s:g} s; "
                                  f"last lines of {log}:\n{server.log_tail()}")
            time.sleep(0.25)
        yield server
    finally:
        _stop(process)


def llama_server(gguf: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                 api_key: str | None = None, parallel: int = 4, ctx_size: int = 2048, threads: int | None = None,
                 model: str | None = None, startup_timeout_s: float = 120, log_path: str | os.PathLike | None = None,
                 extra_args: Sequence[str] = ()):
    """llama.cpp's own `llama-server` on `gguf`: `parallel` slots of `ctx_size` tokens, continuous batching."""
    gguf = check_gguf(gguf)
    port = port or free_port(host)
    model = model or gguf.stem
    cmd = [llamacpp.server_binary(), "--model", gguf, "--host", host, "--port", port, "--alias", model,
           "--ctx-size", ctx_size * parallel, "--parallel", parallel, "--threads", threads or os.cpu_count(),
           "--no-webui", "--metrics", *extra_args]
    if api_key:
        cmd += ["--api-key", api_key]
    return launch("llama-server", cmd, host=host, port=port, model=model, api_key=api_key,
                  startup_timeout_s=startup_timeout_s, log_path=log_path)


def llama_cpp_python_server(gguf: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                            api_key: str | None = None, ctx_size: int = 2048, threads: int | None = None,
                            model: str | None = None, startup_timeout_s: float = 120,
                            log_path: str | os.PathLike | None = None):
    """llama-cpp-python's own server (`python -m llama_cpp.server`): one model, requests queued and served one at a
    time."""
    gguf = check_gguf(gguf)
    port = port or free_port(host)
    model = model or gguf.stem
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", host, "--port", port,
           "--model_alias", model, "--n_ctx", ctx_size, "--n_threads", threads or os.cpu_count(),
           "--interrupt_requests=false"]  # queue requests; by default a new request cuts the running stream short
    if api_key:
        cmd.append(f"--api_key={api_key}")  # one token: a key may start with "-"
    return launch("llama-cpp-python", cmd, host=host, port=port, model=model, api_key=api_key,
                  health_path="/v1/models", startup_timeout_s=startup_timeout_s, log_path=log_path)


def client(server: Server, timeout: float = 120, max_retries: int = 0) -> openai.OpenAI:
    """The official OpenAI client pointed at `server`."""
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key or "none", timeout=timeout,
                         max_retries=max_retries)


def _one_request(api: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    ttft, tokens, chunks, finish = None, None, 0, None
    try:
        stream = api.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                             max_tokens=max_tokens, temperature=0, stream=True,
                                             stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                chunks += 1
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
    except openai.APITimeoutError as e:
        return {"ok": False, "timeout": True, "latency_s": time.perf_counter() - start, "error": str(e)}
    except openai.OpenAIError as e:
        return {"ok": False, "timeout": False, "latency_s": time.perf_counter() - start, "error": str(e)}
    if finish is None:
        return {"ok": False, "timeout": False, "latency_s": time.perf_counter() - start,
                "error": "the stream ended without a finish_reason (cut short)"}
    return {"ok": True, "timeout": False, "latency_s": time.perf_counter() - start, "ttft_s": ttft,
            "tokens": tokens if tokens is not None else chunks}


def load_test(server: Server, prompts: Sequence[str], *, concurrency: int, requests: int, max_tokens: int = 64,
              timeout: float = 120) -> dict:
    """`requests` streamed chat completions from `concurrency` clients at once; latency, TTFT, tokens/s, errors."""
    if not prompts:
        raise ValueError("load_test needs at least one prompt")
    api = client(server, timeout=timeout)
    jobs = [prompts[i % len(prompts)] for i in range(requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda p: _one_request(api, server.model, p, max_tokens), jobs))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    lat = np.array([r["latency_s"] for r in ok]) if ok else np.array([np.nan])
    ttft = np.array([r["ttft_s"] for r in ok if r["ttft_s"] is not None] or [np.nan])
    tokens = sum(r["tokens"] for r in ok)
    return {
        "server": server.name, "concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
        "wall_s": wall, "ok": len(ok), "error_rate": 1 - len(ok) / requests,
        "timeout_rate": sum(r["timeout"] for r in results) / requests,
        "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
        "latency_p99_s": float(np.percentile(lat, 99)), "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)), "output_tokens": tokens, "output_tokens_per_s": tokens / wall,
        "latencies_s": [r["latency_s"] for r in ok], "errors": [r["error"] for r in results if not r["ok"]][:5],
    }


LOAD_COLUMNS = ["server", "concurrency", "requests", "error_rate", "timeout_rate", "latency_p50_s", "latency_p95_s",
                "latency_p99_s", "ttft_p50_s", "output_tokens_per_s"]  # what 05 and 07 tabulate


def load_sweep(server: Server, prompts: Sequence[str], serve) -> list[dict]:
    """`load_test` at each of the params' `serve.load_concurrency` levels (`serve.load_requests_per_client` requests
    per client, `serve.load_max_tokens` each): the sweep 05 and 07 run against every server they compare."""
    return [load_test(server, prompts, concurrency=c, requests=c * serve.load_requests_per_client,
                      max_tokens=serve.load_max_tokens, timeout=serve.request_timeout_s)
            for c in serve.load_concurrency]


def transformers_server(model_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                        parallel: int = 4, max_model_len: int = 2048, device: str = "cpu",
                        continuous_batching: bool = True, threads: int | None = None, startup_timeout_s: float = 300,
                        log_path: str | os.PathLike | None = None):
    """Hugging Face's own OpenAI-compatible server (`transformers serve`, 05_serve_vllm) pinned to a local model folder.

    With continuous batching its paged KV cache holds `parallel` sequences of `max_model_len` tokens (pages of 256
    tokens), not "as much as fits": on a CPU that default would claim most of the RAM. Requests name the model by
    the folder's path (`Server.model`). It has no API key: keep it on loopback behind the gateway. Offline: nothing
    is fetched from a hub.
    """
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise ServerError(f"{model_dir}: not a model folder (no config.json)")
    port = port or free_port(host)
    cmd = [Path(sys.executable).with_name("transformers"), "serve", model_dir, "--host", host, "--port", port,
           "--device", device, "--log-level", "warning"]
    if continuous_batching:
        cmd += ["--continuous-batching", "--cb-num-blocks", -(-parallel * max_model_len // 256),
                "--cb-max-batch-tokens", max_model_len]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return launch("transformers-serve", cmd, host=host, port=port, model=str(model_dir), api_key=None,
                  startup_timeout_s=startup_timeout_s, log_path=log_path, env=env)


def vllm_command(model_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 8000, model: str | None = None,
                 tensor_parallel_size: int = 1, max_model_len: int = 4096,
                 gpu_memory_utilization: float = 0.9) -> list[str]:
    """The `vllm serve` command line for a merged model folder; the API key goes in `VLLM_API_KEY`, never argv."""
    return ["vllm", "serve", str(model_dir), "--host", host, "--port", str(port),
            "--served-model-name", model or Path(model_dir).name, "--tensor-parallel-size", str(tensor_parallel_size),
            "--max-model-len", str(max_model_len), "--gpu-memory-utilization", str(gpu_memory_utilization)]


def vllm_server(model_dir: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                api_key: str | None = None, model: str | None = None, tensor_parallel_size: int = 1,
                max_model_len: int = 4096, gpu_memory_utilization: float = 0.9, startup_timeout_s: float = 900,
                log_path: str | os.PathLike | None = None):
    """vLLM's OpenAI-compatible server on CUDA (PagedAttention, continuous batching). Needs the `gpu` extra and a
    GPU: not exercised on the CPU machines this project is tested on."""
    port = port or free_port(host)
    cmd = vllm_command(model_dir, host=host, port=port, model=model, tensor_parallel_size=tensor_parallel_size,
                       max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization)
    cmd[0] = str(Path(sys.executable).with_name("vllm"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"} | ({"VLLM_API_KEY": api_key} if api_key else {})
    return launch("vllm", cmd, host=host, port=port, model=cmd[cmd.index("--served-model-name") + 1],
                  api_key=api_key, startup_timeout_s=startup_timeout_s, log_path=log_path, env=env)
