"""01's at-scale curation (`aletheia_utils.curate_scale`, datatrove) on a large generated raw file: rows/s, peak RSS
per process and the planted duplicates found, for LocalPipelineExecutor with 1 and 2 workers and Ray with 2 local
workers, at one or more sizes (to show peak memory does not grow with the input).

    .venv/bin/python benchmarks/curate_scale.py --rows 200000 1000000 [--configs local1 local2 ray2] [--note TEXT]

Each (size, executor) runs in a fresh process; a sampling thread follows that process and all its descendants
(datatrove's worker pool, Ray's workers) and records the largest RSS any one of them reached. Results are appended
to benchmarks/results/curate_scale.json (one entry per size and executor, the newest replacing an older one).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results" / "curate_scale.json"
CONFIGS = {"local1": {"kind": "local", "tasks": 2, "workers": 1},
           "local2": {"kind": "local", "tasks": 2, "workers": 2},
           "ray2": {"kind": "ray", "tasks": 2, "workers": 2}}


class PeakRss:
    """Largest RSS of any single process in the tree under `pid`, sampled every `every` seconds."""

    def __init__(self, pid: int, every: float = 0.5):
        import psutil

        self.root, self.every, self.peak, self.peak_total = psutil.Process(pid), every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            sizes = []
            for p in procs:
                try:
                    sizes.append(p.memory_info().rss)
                except psutil.Error:
                    pass
            if sizes:
                self.peak, self.peak_total = max(self.peak, max(sizes)), max(self.peak_total, sum(sizes))
            self._stop.wait(self.every)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _one(src: str, out: str, executor: dict, queue) -> None:
    from aletheia_utils import config, curate_scale

    cfg = config.load(ROOT / "params" / "default.yaml", ["data.on_invalid=skip"]
                      + [f"data.executor.{k}={v}" for k, v in executor.items()])
    start = time.perf_counter()
    summary = curate_scale.run_params(cfg, src, out, fresh=True)
    queue.put({"seconds": time.perf_counter() - start, "summary": summary})


def measure(src: Path, planted: dict, rows: int, name: str, scratch: Path) -> dict:
    from aletheia_utils import curate_scale

    out = scratch / f"out-{name}"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_one, args=(str(src), str(out), CONFIGS[name], queue))
    proc.start()
    with PeakRss(proc.pid) as peak:
        report = queue.get(timeout=6 * 3600)
        proc.join(timeout=120)
    summary = report["summary"]
    result = {"rows": rows, "input_mib": round(src.stat().st_size / 2**20, 1), "executor": name,
              **CONFIGS[name], "seconds": round(report["seconds"], 1),
              "rows_per_s": round(rows / report["seconds"], 1), "peak_rss_mib_one_process": round(peak.peak / 2**20),
              "peak_rss_mib_all_processes": round(peak.peak_total / 2**20),
              "stage_seconds": summary["seconds"],
              "funnel": {k: v for k, v in summary.items() if k not in ("seconds", "total_seconds", "executor")},
              "planted": curate_scale.planted_found(out, planted)}
    shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[200_000, 1_000_000])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--note", default="", help="what else ran on the machine, what was not run")
    parser.add_argument("--scratch", default=None, help="folder for the generated input and outputs (default: tmp)")
    args = parser.parse_args()

    from aletheia_utils import curate_scale
    from benchmarks.common import machine

    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="aletheia-curate-scale-"))
    scratch.mkdir(parents=True, exist_ok=True)
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    runs = old["runs"]
    try:
        for rows in args.rows:
            src = scratch / f"raw-{rows}.jsonl"
            planted = curate_scale.synthetic_corpus(src, rows)
            for name in args.configs:
                result = measure(src, planted, rows, name, scratch) | {
                    "date": time.strftime("%Y-%m-%d %H:%M"), "command": "benchmarks/curate_scale.py "
                    + " ".join(sys.argv[1:]), "note": args.note, "machine": machine()}
                runs = [r for r in runs if (r["rows"], r["executor"]) != (rows, name)] + [result]
                RESULTS.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
            src.unlink()
    finally:
        if not args.scratch:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
