"""Shared plumbing of the benchmark scripts (benchmarks/README.md, "Performance"): the machine they ran on, a scratch
run folder that reuses a finished run's curated data, timing, and the results JSON + bar chart in `benchmarks/results/`.
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import aletheia_utils as au

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_RUN = ROOT / "runs" / "default-check"
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def machine() -> dict:
    """CPU model, cores, the flags that decide bf16 speed, library versions and the load average now."""
    import torch

    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                 platform.processor())
    flags = au.pipeline.cpu_flags()
    return {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "flags": {f: f in flags for f in FLAGS}, "versions": au.pipeline.versions(),
            "load_average_1_5_15": list(os.getloadavg())}


def matmul_peak(n: int = 2048, warmup: int = 3, reps: int = 10, budget_s: float = 5.0) -> dict:
    """The machine's matmul peak: FLOP/s of an n×n by n×n `torch.mm` (2·n³ FLOPs) in bf16 and in fp32 at torch's
    current thread count (set it as training will run first), the best of up to `reps` timed multiplications after
    `warmup` untimed ones of both dtypes (the BLAS thread pools start on the first calls), each dtype cut short once
    `budget_s` is spent (an emulated bf16 matmul can be slow). `peak_flops` is the faster of the two: what a
    variant's fraction of the peak is taken against."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    result = {"n": n, "threads": torch.get_num_threads()}
    operands = {"bf16": (a.bfloat16(), b.bfloat16()), "fp32": (a, b)}
    for x, y in operands.values():
        for _ in range(warmup):
            torch.mm(x, y)
    for name, (x, y) in operands.items():
        times, start = [], time.perf_counter()
        while len(times) < reps and (not times or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            torch.mm(x, y)
            times.append(time.perf_counter() - t0)
        result[f"{name}_flops"] = 2 * n**3 / min(times)
        result[f"{name}_reps"] = len(times)
    result["peak_flops"] = max(result["bf16_flops"], result["fp32_flops"])
    result["peak_precision"] = "bf16" if result["bf16_flops"] >= result["fp32_flops"] else "fp32"
    print(f"matmul peak ({n}x{n}, {result['threads']} threads): bf16 {result['bf16_flops'] / 1e9:.1f} GFLOP/s, "
          f"fp32 {result['fp32_flops'] / 1e9:.1f} GFLOP/s", flush=True)
    return result


def against_peak(flops: float, seconds: float, peak: dict, precision: str) -> dict:
    """A variant's model FLOPs over its time, as FLOP/s and as fractions of `matmul_peak`'s faster dtype and of the
    dtype the variant trained in."""
    achieved = flops / seconds
    return {"model_flops": flops, "model_flops_per_s": achieved, "fraction_of_peak": achieved / peak["peak_flops"],
            "fraction_of_own_precision_peak": achieved / peak[f"{precision}_flops"]}


def source_run(path: str | None) -> Path:
    """The finished run whose curated data (and adapters) a benchmark reuses, as an absolute path (a scratch run's
    links to it must not dangle); a clear error if it is missing."""
    run = (Path(path) if path else DEFAULT_RUN).resolve()
    if not (run / "01_curate" / "sft.jsonl").is_file():
        raise SystemExit(f"{run}: no 01_curate/sft.jsonl; run `aletheia run --params params/default.yaml "
                         f"--run-name default-check --to 03_dpo` first or pass --run-dir")
    return run


def relative(path: str | os.PathLike) -> str:
    """A path as a results file records it: relative to the project (`runs/default-check`, `../` when outside it),
    never the absolute path of the machine that ran the benchmark."""
    return os.path.relpath(Path(path).resolve(), ROOT)


@contextmanager
def scratch_run(source: Path, *stages: str):
    """A temporary run folder whose `stages` (e.g. 01_curate) link to `source`'s; removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="aletheia-bench-"))
    try:
        for stage in stages:
            (root / stage).symlink_to(source / stage, target_is_directory=True)
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Timer:
    """`with Timer() as t: ...` then `t.s` holds the wall seconds and `t.cpu_s` this process's CPU seconds (less
    sensitive than wall time to other programs sharing the cores)."""

    def __enter__(self):
        self._start, self._cpu, self.s, self.cpu_s = time.perf_counter(), time.process_time(), None, None
        return self

    def __exit__(self, *exc):
        self.s, self.cpu_s = time.perf_counter() - self._start, time.process_time() - self._cpu


def shown(row: dict) -> dict:
    """Print a variant's result (without its per-step lists) as it finishes, and free the memory it held."""
    import gc

    print({k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
    gc.collect()
    return row


def profile(train, top: int = 12) -> dict:
    """Run `train()` under torch.profiler: the operators with the most self CPU time and their share of it (what
    bounds a step, measured rather than guessed)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof, Timer() as t:
        train()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    result = {"wall_s": t.s, "self_cpu_s": total / 1e6,
              "top_ops": [{"op": e.key, "calls": e.count, "self_cpu_s": round(e.self_cpu_time_total / 1e6, 3),
                           "share": round(e.self_cpu_time_total / total, 3)} for e in ranked]}
    for row in result["top_ops"]:
        print(f"  {row['share']:6.1%}  {row['self_cpu_s']:8.2f} s  {row['calls']:7d}  {row['op']}")
    return result


def stock_batches(per_device: int, accumulation: int) -> tuple[int, int]:
    """TRL's default micro-batch (8 rows) with gradient accumulation keeping the project's effective batch."""
    effective = per_device * accumulation
    micro = next(b for b in range(min(8, effective), 0, -1) if effective % b == 0)
    return micro, effective // micro


def pick_gguf(run: Path, cfg) -> tuple[Path, str]:
    """The run's 06_gguf/model-<serve_quant>.gguf when it exists, else the embedded model's own GGUF (same
    architecture and size as the merged model)."""
    tuned = au.gguf.gguf_path(run / "06_gguf", cfg.gguf.serve_quant)
    if tuned.is_file():
        return tuned, f"tuned {cfg.gguf.serve_quant} (06_gguf)"
    return au.models.embedded_gguf(cfg.run.base_model.removeprefix("embedded:")), "embedded base Q4_1"


def write(name: str, result: dict, bars: dict[str, float], ylabel: str, figure=None) -> Path:
    """`benchmarks/results/<name>.json` with the machine (load average at the end too) and `<name>.png`: `figure`
    if given, else one bar per variant of `bars` (variant -> value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = {"benchmark": name, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **result,
              "load_average_at_end": list(os.getloadavg())}
    path = au.pipeline.write_json(RESULTS / f"{name}.json", result)
    if figure is not None:
        with au.files.atomic_write(RESULTS / f"{name}.png") as tmp:
            figure.savefig(tmp, dpi=110, format="png")
        plt.close(figure)
        return path
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels, values = list(bars), list(bars.values())
    ax.barh(labels, values, color=["#999999"] * (len(values) - 1) + ["#2a6fdb"])
    for y, v in enumerate(values):
        ax.text(v, y, f" {v:.3g} ({v / values[0]:.1f}×)", va="center")
    ax.set_xlabel(ylabel)
    ax.set_xlim(0, max(values) * 1.3)
    ax.set_title(f"{name} — {result['machine']['cpu']}, {result['machine']['cores']} cores", fontsize=9)
    fig.tight_layout()
    with au.files.atomic_write(RESULTS / f"{name}.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
