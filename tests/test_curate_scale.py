"""01's at-scale path (`curate_scale`, datatrove): the same kept rows as the in-memory path on the shipped corpus,
bad lines set aside with FILE:LINE, `on_invalid: fail` writes nothing, a rerun resumes (also after a real SIGKILL of the
command), executors that cannot start say so in one sentence."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from aletheia_utils import config, curate, curate_scale, data, models, pii

ROOT = Path(__file__).resolve().parent.parent
RAW = str(ROOT / "data" / "raw" / "*.jsonl")
NEAR_TOLERANCE = 0.02  # MinHash is approximate: kept sets may differ by at most 2% of the exact-deduped rows


@pytest.fixture(scope="module")
def cfg():
    return config.load(ROOT / "params" / "default.yaml")


def in_memory(cfg, near: bool) -> list[dict]:
    """The notebook's functions on the same steps: normalize, rule filters (no relevance), PII, dedup."""
    from transformers import AutoTokenizer

    d = cfg.data
    rows, _ = data.load_rows(sorted(Path(ROOT / "data" / "raw").glob("*.jsonl")), "raw")
    rows, _ = curate.normalize(rows)
    rows, _ = curate.quality_filter(
        rows, tokenizer=AutoTokenizer.from_pretrained(models.resolve(cfg.run.base_model)), embed=None,
        topics=d.domain_topics, offtopic=d.offtopic_topics, min_tokens=d.min_answer_tokens,
        max_tokens=d.max_answer_tokens, relevance_min=d.relevance_min, repeat_overlap_max=d.repeat_overlap_max,
        boilerplate=d.boilerplate_patterns)
    rows, _, _ = pii.scrub_pii(rows, pii.PiiScrubber(d.pii_min_score))
    kept, _ = curate.dedup(rows, d.near_dup_threshold if near else None, seed=cfg.run.seed)
    return kept


@pytest.mark.parametrize("kind, tasks", [("local", 1), ("local", 2), pytest.param("ray", 2, marks=pytest.mark.slow)])
def test_datatrove_keeps_the_same_rows_as_the_in_memory_path(cfg, tmp_path, kind, tasks):
    ex = cfg.data.executor.model_copy(update={"kind": kind, "tasks": tasks, "workers": tasks})
    summary = curate_scale.run_params(cfg.model_copy(update={"data": cfg.data.model_copy(update={"executor": ex})}),
                                      RAW, tmp_path)
    if kind == "ray":  # the local Ray the run started is stopped: no Ray process of ours is left
        import ray

        assert not ray.is_initialized()
        _wait_for(lambda: not _ray_children(), 30, lambda: f"Ray processes still run: {_ray_children()}")
    kept = {r["id"] for r in curate_scale.kept_rows(tmp_path)}
    near = {r["id"] for r in curate_scale.removed_rows(tmp_path) if r["reason"] == "near_duplicate"}
    exact = in_memory(cfg, near=False)
    # per-row steps and exact dedup: the very same rows, with the same text
    assert kept | near == {r["id"] for r in exact}
    by_id = {r["id"]: r for r in exact}
    for r in curate_scale.kept_rows(tmp_path):
        assert (r["question"], r["answer"]) == (by_id[r["id"]]["question"], by_id[r["id"]]["answer"])
    # near dedup: approximate, within the stated tolerance
    full = {r["id"] for r in in_memory(cfg, near=True)}
    assert len(kept ^ full) <= NEAR_TOLERANCE * len(exact), (sorted(kept - full), sorted(full - kept))
    assert summary["rows_in"] == 666 and summary["invalid rows"] == 0
    assert summary["rows_out"] == len(kept) and sum(summary["pii_spans"].values()) > 0


def _ray_children() -> list[str]:
    """Command lines of this process's live descendants that belong to Ray."""
    import psutil

    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE and "ray" in " ".join(p.cmdline()):
                found.append(" ".join(p.cmdline())[:120])
        except psutil.NoSuchProcess:
            pass
    return found


def _write(path: Path, lines: list) -> Path:
    with open(path, "wb") as fh:
        for line in lines:
            text = line if isinstance(line, bytes | str) else json.dumps(line)
            fh.write((text if isinstance(text, bytes) else text.encode()) + b"\n")
    return path


def _small_input(tmp_path: Path) -> Path:
    good = [json.loads(line) for line in open(ROOT / "data" / "raw" / "groupA_authored.jsonl")][:20]
    src = tmp_path / "in"
    src.mkdir()
    _write(src / "big.jsonl", good[:10] + ['{"id": "x", "question": ', b'{"id": "y", "question": "caf\xe9"}']
           + good[10:] + [{"prompt": "p", "response": "r"}])
    return src


def test_bad_lines_go_to_the_rejected_file_with_file_and_line(cfg, tmp_path):
    src = _small_input(tmp_path)
    ex = cfg.data.executor.model_copy(update={"tasks": 2, "workers": 1})  # one file cut into two byte ranges
    out = tmp_path / "out"
    summary = curate_scale.run(str(src / "*.jsonl"), out, rules=curate.Rules.from_config(cfg.data),
                               tokenizer_path=str(models.resolve(cfg.run.base_model)), executor=ex)
    rejected = sorted((json.loads(line) for f in (out / "rejected").glob("*.jsonl") for line in open(f)),
                      key=lambda r: r["line"])
    path = str(src / "big.jsonl")
    assert [(r["file"], r["line"]) for r in rejected] == [(path, 11), (path, 12), (path, 23)]
    assert rejected[0]["reasons"] == ["(row): malformed JSON (Expecting value at column 26)"]
    assert rejected[1]["reasons"] == ["(row): not UTF-8 (byte 0xe9 at column 29)"]
    assert rejected[2]["reasons"][0].startswith("(row): looks like a sft row")
    assert summary["invalid rows"] == 3 and summary["rows_in"] == 23
    assert len({r["id"] for r in curate_scale.kept_rows(out)}) == summary["rows_out"] > 0


def test_on_invalid_fail_names_every_bad_line_and_writes_nothing(cfg, tmp_path):
    src = _small_input(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(data.InvalidData) as err:
        curate_scale.run(str(src / "*.jsonl"), out, rules=curate.Rules.from_config(cfg.data),
                         tokenizer_path=str(models.resolve(cfg.run.base_model)), on_invalid="fail",
                         executor=cfg.data.executor.model_copy(update={"tasks": 1, "workers": 1}))
    assert str(err.value).splitlines()[0] == f"{src / 'big.jsonl'}:11: (row): malformed JSON (Expecting value at " \
                                             "column 26)"
    assert len(err.value.problems) == 3
    assert not any(out.iterdir())


def test_a_rerun_continues_from_the_completed_tasks(cfg, tmp_path):
    src = _small_input(tmp_path)
    kw = dict(rules=curate.Rules.from_config(cfg.data), tokenizer_path=str(models.resolve(cfg.run.base_model)),
              executor=cfg.data.executor.model_copy(update={"tasks": 1, "workers": 1}))
    first = curate_scale.run(str(src / "*.jsonl"), tmp_path / "out", **kw)
    # as if killed during the last stage: its output and completion markers are gone, the earlier stages' stay
    shutil.rmtree(tmp_path / "out" / "kept")
    shutil.rmtree(tmp_path / "out" / "logs" / "write" / "completions")
    marker = tmp_path / "out" / "logs" / "clean" / "completions" / "00000"
    before = marker.stat().st_mtime_ns
    again = curate_scale.run(str(src / "*.jsonl"), tmp_path / "out", **kw)
    assert marker.stat().st_mtime_ns == before  # the clean stage was not run again
    assert {k: v for k, v in again.items() if k != "seconds" and k != "total_seconds"} == \
        {k: v for k, v in first.items() if k != "seconds" and k != "total_seconds"}


def _markers(out: Path) -> dict[Path, int]:
    """Every datatrove completed-task marker of a run (`logs/<stage>/completions/<rank>`), with its mtime."""
    return {p: p.stat().st_mtime_ns for p in (out / "logs").glob("*/completions/*")}


def _command(src: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "aletheia_utils.cli", "curate-at-scale",
            "--params", str(ROOT / "params" / "smoke.yaml"),
            "--input", str(src / "*.jsonl"), "--output", str(out), "--set", "data.on_invalid=skip",
            "--set", "data.executor.tasks=4", "--set", "data.executor.workers=1"]


def _run_command(src: Path, out: Path, log: Path, started: list) -> subprocess.Popen:
    """The command in its own process group (what a kill of the job kills), added to `started`."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    with open(log, "wb") as fh:
        started.append(subprocess.Popen(_command(src, out), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                        start_new_session=True))
    return started[-1]


def _wait_for(condition, timeout: float, message) -> None:
    """Poll `condition` every 50 ms until it holds; fail with `message()` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message()
        time.sleep(0.05)


def _group_running(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (a zombie no longer does)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            return True
    return False


@pytest.mark.slow
def test_a_killed_command_resumes_without_redoing_completed_tasks(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    curate_scale.synthetic_corpus(src / "raw.jsonl", 120)
    started: list[subprocess.Popen] = []
    try:
        _killed_and_resumed(src, tmp_path, started)
    finally:
        for proc in started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


def _killed_and_resumed(src: Path, tmp_path: Path, started: list) -> None:
    def tail(name):
        return lambda: (tmp_path / f"{name}.log").read_text()[-3000:]

    # the same command run to its end, for the reference
    assert _run_command(src, tmp_path / "ref", tmp_path / "ref.log", started).wait(timeout=1800) == 0, tail("ref")()
    # killed with its whole process group once some of the first stage's four tasks have completed
    out = tmp_path / "out"
    killed = _run_command(src, out, tmp_path / "killed.log", started)
    _wait_for(lambda: killed.poll() is not None or any((out / "logs" / "clean" / "completions").glob("*")), 1800,
              tail("killed"))
    assert killed.poll() is None, tail("killed")()
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    _wait_for(lambda: not _group_running(killed.pid), 60, lambda: "a killed process still runs")
    done = _markers(out)
    assert done and not (out / "summary.json").exists()
    # the same command again: continues, and redoes no completed task
    assert _run_command(src, out, tmp_path / "again.log", started).wait(timeout=1800) == 0, tail("again")()
    after = _markers(out)
    assert set(done) < set(after)
    assert {p.relative_to(out) for p in after} == {p.relative_to(tmp_path / "ref") for p in _markers(tmp_path / "ref")}
    assert {p: after[p] for p in done} == done  # no completed task's marker was written again
    for stage in {p.parent.parent for p in done}:
        n_done, n_all = sum(p.parent.parent == stage for p in done), len(list((stage / "completions").iterdir()))
        said = (f"Skipping {n_done} already completed tasks" if n_done < n_all
                else f"Not doing anything as all {n_all} tasks have already been completed")
        assert said in (stage / "console.log").read_text(), stage.name
    # and ends where the uninterrupted run ended: the same kept rows, the same funnel
    assert sorted(r["id"] for r in curate_scale.kept_rows(out)) == \
        sorted(r["id"] for r in curate_scale.kept_rows(tmp_path / "ref"))
    funnel = {k: v for k, v in json.loads((out / "summary.json").read_text()).items() if "seconds" not in k}
    assert funnel == {k: v for k, v in json.loads((tmp_path / "ref" / "summary.json").read_text()).items()
                      if "seconds" not in k}
    assert funnel["rows_in"] == 120 and funnel["rows_out"] > 0


def test_executors_that_cannot_start_fail_at_once_in_one_sentence(cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray is optional: not a project dependency
    with pytest.raises(curate_scale.ExecutorUnavailable, match="kind is ray but Ray is not installed"):
        curate_scale.run_params(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"executor": config.Executor(kind="ray")})}), RAW, tmp_path / "out")
    assert not (tmp_path / "out" / "work").exists()
    calls = []

    def timed_out(**kw):
        calls.append("init")
        raise TimeoutError("The current node timed out during startup.\nmore of Ray's log")

    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(
        is_initialized=lambda: False, init=timed_out, shutdown=lambda: calls.append("shutdown")))
    with pytest.raises(curate_scale.ExecutorUnavailable,
                       match=r"^cannot start the Ray executor locally: The current node timed out during startup\.$"):
        curate_scale.check_executor(config.Executor(kind="ray"))
    assert calls == ["init", "shutdown"]  # what a failed local start left running is stopped
    monkeypatch.setattr(shutil, "which", lambda name: None)
    slurm = config.Executor(kind="slurm", slurm_partition="cpu")
    with pytest.raises(curate_scale.ExecutorUnavailable, match="no Slurm here"):
        curate_scale.check_executor(slurm)
    with pytest.raises(config.ConfigError, match="slurm_partition"):
        config.load(ROOT / "params" / "smoke.yaml", {"data.executor.kind": "slurm"})


def test_curate_at_scale_command(tmp_path, capsys):
    from aletheia_utils import cli

    src = _small_input(tmp_path)
    base = ["curate-at-scale", "--params", str(ROOT / "params" / "smoke.yaml"), "--input", str(src / "*.jsonl"),
            "--output", str(tmp_path / "out")]
    assert cli.main(base + ["--set", "data.on_invalid=skip"]) == 0
    printed = capsys.readouterr().out
    assert "rows_in: 23" in printed and "invalid rows: 3" in printed
    assert cli.main(base + ["--fresh"]) == 2  # smoke.yaml keeps on_invalid: fail
    assert f"{src / 'big.jsonl'}:11: (row): malformed JSON" in capsys.readouterr().err
    assert not (tmp_path / "out" / "kept").exists()
