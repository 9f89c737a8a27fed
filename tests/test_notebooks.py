"""DESIGN.md's notebook conventions, checked on the committed notebooks."""

import ast
import json
import re
from pathlib import Path

import nbformat
import pytest

from aletheia_utils.pipeline import STAGES

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_one_notebook_per_stage():
    assert [p.stem for p in NOTEBOOKS] == list(STAGES)


@pytest.fixture(params=NOTEBOOKS, ids=lambda p: p.stem)
def nb(request):
    return request.param.stem, nbformat.read(request.param, as_version=4)


def test_committed_without_outputs(nb):
    _, book = nb
    for cell in book.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cell_ids_are_unique(path):  # read raw: nbformat would rename duplicates with only a warning
    ids = [c["id"] for c in json.loads(path.read_text(encoding="utf-8"))["cells"]]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


def test_title_block(nb):
    stage, book = nb
    first = book.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith(f"# {stage[:2]} · ")
    assert "**What you'll learn**" in first.source and "**Reads:**" in first.source
    bullets = re.findall(r"^- ", first.source, re.M)
    assert 3 <= len(bullets) <= 5


def test_exactly_one_parameters_cell_of_literals(nb):
    _, book = nb
    tagged = [c for c in book.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    for stmt in ast.parse(tagged[0].source).body:
        assert isinstance(stmt, ast.Assign), "only assignments in the parameters cell"
        ast.literal_eval(stmt.value)  # raises on anything but a literal
    names = {t.id for s in ast.parse(tagged[0].source).body for t in s.targets}
    assert names == {"params_file", "run_dir"}


def test_config_cell_follows_parameters_and_paths_come_from_the_run(nb):
    stage, book = nb
    idx = next(i for i, c in enumerate(book.cells) if "parameters" in c.metadata.get("tags", []))
    nxt = book.cells[idx + 1].source
    assert "au.config.load(params_file)" in nxt and "RunPaths.for_run(cfg, run_dir)" in nxt
    code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
    assert not re.search(r"[\"'](\.\./)?(runs|data)/", code.replace('"../params/default.yaml"', "")), \
        "paths are derived from the run folder, never hard-coded"


def test_summary_then_metrics_cell_then_exercises_and_references(nb):
    stage, book = nb
    assert any(c.cell_type == "markdown" and c.source.startswith("## Summary") for c in book.cells)
    last_code = max(i for i, c in enumerate(book.cells) if c.cell_type == "code")
    assert f'au.pipeline.write_metrics(paths, "{stage}"' in book.cells[last_code].source
    after = [c.source.split("\n", 1)[0] for c in book.cells[last_code + 1:]]
    assert after == ["## Exercises", "## References"], after
    exercises = book.cells[last_code + 1].source
    assert 2 <= len(re.findall(r"^\d\. ", exercises, re.M)) <= 3


def test_headless_safe(nb):
    _, book = nb
    code = "\n".join(c.source for c in book.cells if c.cell_type == "code")
    assert not re.search(r"^\s*[!%]pip install", code, re.M)
    assert not re.search(r"notebook_login\(|push_to_hub\s*=\s*True|input\(", code)
