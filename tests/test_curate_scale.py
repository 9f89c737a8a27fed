"""01's at-scale path (`curate_scale`, datatrove): the same kept rows as the in-memory path on the shipped corpus,
bad lines set aside with FILE:LINE, `on_invalid: fail` writes nothing, a rerun resumes, executors that cannot start
say so in one sentence."""

import json
import shutil
import sys
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


@pytest.mark.parametrize("tasks", [1, 2])
def test_datatrove_keeps_the_same_rows_as_the_in_memory_path(cfg, tmp_path, tasks):
    ex = cfg.data.executor.model_copy(update={"tasks": tasks, "workers": tasks})
    summary = curate_scale.run_params(cfg.model_copy(update={"data": cfg.data.model_copy(update={"executor": ex})}),
                                      RAW, tmp_path)
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


def test_executors_that_cannot_start_fail_at_once_in_one_sentence(cfg, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray is optional: not a project dependency
    with pytest.raises(curate_scale.ExecutorUnavailable, match="kind is ray but Ray is not installed"):
        curate_scale.run_params(cfg.model_copy(update={"data": cfg.data.model_copy(
            update={"executor": config.Executor(kind="ray")})}), RAW, tmp_path / "out")
    assert not (tmp_path / "out" / "work").exists()
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
