"""benchmarks/common.py: results record project-relative paths; a relative --run-dir works."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_results_record_no_absolute_paths():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        absolute = [s for s in _strings(json.loads(path.read_text())) if s.startswith("/")]
        assert not absolute, f"{path.name}: {absolute}"
    assert common.relative(ROOT / "runs" / "default-check") == "runs/default-check"


def test_a_relative_run_dir_is_resolved_and_its_scratch_links_do_not_dangle(tmp_path, monkeypatch):
    (tmp_path / "runs" / "r" / "01_curate").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "01_curate" / "sft.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    source = common.source_run("runs/r")
    assert source == tmp_path / "runs" / "r"
    with common.scratch_run(source, "01_curate") as scratch:
        assert (scratch / "01_curate" / "sft.jsonl").is_file()
