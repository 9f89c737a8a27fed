"""The runner end to end on params/smoke.yaml, through the `aletheia` command."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from aletheia_utils.gguf import read_metadata
from aletheia_utils.pipeline import STAGES

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"


def aletheia(*args):
    return subprocess.run([sys.executable, "-m", "aletheia_utils.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=1800)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    proc = aletheia("run", "--params", str(SMOKE), "--run-name", "smoke-test", "--set", f"run.runs_dir={runs}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return runs / "smoke-test", proc


@pytest.mark.slow
def test_smoke_run_executes_every_stage(smoke_run):
    run_dir, proc = smoke_run
    assert [p.stem for p in sorted((run_dir / "notebooks").glob("*.ipynb"))] == list(STAGES)
    assert [p.stem for p in sorted((run_dir / "html").glob("*.html"))] == list(STAGES)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert [manifest["stages"][s]["status"] for s in STAGES] == ["complete"] * len(STAGES)
    assert manifest["versions"]["torch"].startswith("2.13") and len(manifest["params_hash"]) == 16
    for s in STAGES:
        assert json.loads((run_dir / "metrics" / f"{s}.json").read_text())["stage"] == s
    assert "[1/8] 01_curate: running" in proc.stdout and "[8/8] 08_evaluate: done" in proc.stdout
    assert "without encryption" not in proc.stderr  # kernels talk over IPC sockets, not TCP
    m = {s: json.loads((run_dir / "metrics" / f"{s}.json").read_text()) for s in STAGES}  # each stage did its work
    assert m["01_curate"]["files"]["sft.jsonl"] > 0 and m["01_curate"]["funnel"][0]["remaining"] == 120
    assert m["02_sft"]["steps"] == 4 and m["02_sft"]["val_loss_after"] < m["02_sft"]["val_loss_before"]
    assert m["02_sft"]["precision_choice"]["by"] == "measured" and m["02_sft"]["device"] == "cpu"
    assert m["03_dpo"]["steps"] == 3 and "eval_rewards/accuracies" in m["03_dpo"]["eval"]
    assert m["04_merge"]["check"]["greedy_identical"] == m["04_merge"]["check"]["prompts"] == 2
    assert sorted(v["status"] for v in m["05_serve_vllm"]["refused"].values()) == [400, 400, 401, 404]  # JSON sorts
    assert m["06_gguf"]["serve_quant"] in {level["level"] for level in m["06_gguf"]["levels"]}
    assert m["07_serve_cpu"]["errors"]["wrong key"]["status"] == 401 and m["07_serve_cpu"]["load_test"]
    ladder = json.loads((run_dir / "06_gguf" / "quants.json").read_text())
    assert [r["level"] for r in ladder] == ["F16", "Q8_0", "Q4_K_M", "Q4_K_M-imatrix"]
    assert all(r["perplexity"] > 1 for r in ladder)
    imatrix = m["06_gguf"]["imatrix"]  # from the training split, 4 chunks of 256 tokens (smoke.yaml)
    assert imatrix["calibration"] == "01_curate/sft.jsonl" and imatrix["chunk_size"] == 256 and imatrix["chunks"] == 4
    assert read_metadata(run_dir / "06_gguf" / "model-Q4_K_M-imatrix.gguf")["imatrix"].endswith("imatrix.gguf")
    summary = (run_dir / "report" / "summary.md").read_text()
    assert summary.split("\n## ")[1].startswith("Verdict: did tuning help?") and "win_rate" in summary
    assert "| aletheia_humaneval | skipped by eval.skip_tasks: as in the default run" in summary
    evaluation = json.loads((run_dir / "metrics" / "08_evaluate.json").read_text())
    assert set(evaluation["verdict"]) == {"sft vs base", "dpo vs base", "dpo vs sft", "gguf vs base"}  # JSON sorts
    assert all(c["differences"]["rouge_l"]["prompts"] == 4 for c in evaluation["comparisons"].values())


@pytest.mark.slow
def test_smoke_curation_writes_valid_files_and_a_data_card(smoke_run):
    from aletheia_utils import data

    run_dir, _ = smoke_run
    stage = run_dir / "01_curate"
    metrics = json.loads((run_dir / "metrics" / "01_curate.json").read_text())
    for name, kind in (("sft.jsonl", "sft"), ("sft_val.jsonl", "sft"), ("eval.jsonl", "sft"), ("dpo.jsonl", "dpo")):
        ok, problems = data.validate_file(stage / name, kind)
        assert ok == metrics["files"][name] > 0 and problems == []
    assert metrics["funnel"][0]["remaining"] == 120
    assert sum(metrics["splits"].values()) == metrics["funnel"][-1]["remaining"]
    assert {json.loads(line)["rejected_source"] for line in open(stage / "dpo.jsonl")} <= {"truncated", "generic",
                                                                                           "wrong_detail"}
    card = (stage / "data_card.md").read_text()
    assert "## Funnel" in card and "| `sft.jsonl` |" in card
    assert not [p for p in stage.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_rerun_skips_complete_stages_unless_forced(smoke_run):
    run_dir, _ = smoke_run
    runs = str(run_dir.parent)
    again = aletheia("run", "--params", str(SMOKE), "--run-name", "smoke-test", "--set", f"run.runs_dir={runs}")
    assert again.returncode == 0 and again.stdout.count("skipped") == len(STAGES), again.stdout
    forced = aletheia("run", "--params", str(SMOKE), "--run-name", "smoke-test", "--set", f"run.runs_dir={runs}",
                      "--from", "08", "--force")
    assert forced.returncode == 0 and "[1/1] 08_evaluate: done" in forced.stdout, forced.stdout + forced.stderr


@pytest.mark.slow
def test_failing_stage_stops_the_run_and_keeps_its_notebook(tmp_path):
    notebooks = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", notebooks)
    book = nbformat.read(notebooks / "01_curate.ipynb", as_version=4)
    book.cells.insert(7, nbformat.v4.new_code_cell('raise RuntimeError("loss is nan")'))
    nbformat.write(book, notebooks / "01_curate.ipynb")
    proc = aletheia("run", "--params", str(SMOKE), "--run-name", "fails", "--set", f"run.runs_dir={tmp_path}",
                    "--to", "02", "--notebooks", str(notebooks))
    assert proc.returncode == 1
    assert "error: 01_curate failed in cell" in proc.stderr and "RuntimeError: loss is nan" in proc.stderr
    manifest = json.loads((tmp_path / "fails" / "manifest.json").read_text())
    assert manifest["stages"]["01_curate"]["status"] == "failed"
    assert "02_sft" not in manifest["stages"]
    partial = nbformat.read(tmp_path / "fails" / "notebooks" / "01_curate.ipynb", as_version=4)
    assert any(o.get("ename") == "RuntimeError" for c in partial.cells if c.cell_type == "code" for o in c.outputs)


HOLD_THE_RUN = """
import sys, time
from pathlib import Path
from aletheia_utils import pipeline

def stage_until_released(stage, notebooks, paths, log_output):
    while not Path(sys.argv[2]).exists():
        time.sleep(0.05)
pipeline._execute = stage_until_released
pipeline.run(pipeline.config_mod.load(sys.argv[1], [f"run.runs_dir={sys.argv[3]}", "run.name=same"]), stop="01")
"""


def test_a_second_run_on_the_same_folder_refuses_naming_the_first(tmp_path):
    """Two `aletheia run` on one run folder at once would write the same files: the second one refuses."""
    release, manifest = tmp_path / "release", tmp_path / "same" / "manifest.json"
    first = subprocess.Popen([sys.executable, "-c", HOLD_THE_RUN, str(SMOKE), str(release), str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (manifest.exists() and json.loads(manifest.read_text())["stages"]):  # 01 is running
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        second = aletheia("run", "--params", str(SMOKE), "--run-name", "same", "--set", f"run.runs_dir={tmp_path}",
                          "--to", "01", "--notebooks", str(tmp_path / "no-notebooks"))
        assert second.returncode == 2
        assert second.stderr.strip() == (f"error: {(tmp_path / 'same').resolve()} is in use by another `aletheia run` "
                                         f"(PID {first.pid}); wait for it to end or choose another --run-name")
    finally:
        release.touch()
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    assert json.loads(manifest.read_text())["stages"]["01_curate"]["status"] == "complete"


KILLED_AFTER_THE_STAGE = """
import os, signal, sys
from pathlib import Path
from aletheia_utils import pipeline

def stage_then_killed(stage, notebooks, paths, log_output):
    (paths.stage(stage)).mkdir(parents=True, exist_ok=True)
    (paths.stage(stage) / "artifact.txt").write_text("written")
    os.kill(os.getpid(), signal.SIGKILL)  # the artifacts exist, the manifest still says "running"
pipeline._execute = stage_then_killed
pipeline.run(pipeline.config_mod.load(sys.argv[1], [f"run.runs_dir={sys.argv[2]}", "run.name=killed"]), stop="01")
"""

RECORD_THE_STAGE = """
import sys
from aletheia_utils import pipeline

pipeline._execute = lambda stage, notebooks, paths, log_output: print("executed", stage)
pipeline.run(pipeline.config_mod.load(sys.argv[1], [f"run.runs_dir={sys.argv[2]}", "run.name=killed"]), stop="01")
"""


def test_a_stage_killed_before_the_manifest_update_is_redone(tmp_path):
    """SIGKILL between a stage's artifacts and the manifest's "complete": the rerun redoes the stage."""
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_THE_STAGE, str(SMOKE), str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    run = tmp_path / "killed"
    assert (run / "01_curate" / "artifact.txt").exists()
    assert json.loads((run / "manifest.json").read_text())["stages"]["01_curate"]["status"] == "running"
    rerun = subprocess.run([sys.executable, "-c", RECORD_THE_STAGE, str(SMOKE), str(tmp_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "executed 01_curate" in rerun.stdout and "skipped" not in rerun.stdout
    assert json.loads((run / "manifest.json").read_text())["stages"]["01_curate"]["status"] == "complete"


def test_bad_params_give_one_line_naming_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(SMOKE.read_text().replace("max_steps: 4", "max_stepz: 4"))
    proc = aletheia("run", "--params", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {bad}: sft.max_stepz: unknown key"


def test_unknown_stage_and_bad_override(tmp_path):
    proc = aletheia("run", "--params", str(SMOKE), "--from", "09_deploy", "--set", f"run.runs_dir={tmp_path}")
    assert proc.returncode == 2 and "unknown stage '09_deploy'" in proc.stderr
    proc = aletheia("run", "--params", str(SMOKE), "--set", "sft.lora.r=-3")
    assert proc.returncode == 2 and proc.stderr.strip().endswith("sft.lora.r: Input should be greater than or "
                                                                 "equal to 1 (got -3)")


def test_bad_raw_data_stops_curation_before_anything_is_written(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text('{"id": "1", "topic": "t", "source": "s", "question": "q", "answer": 5}\n')
    proc = aletheia("run", "--params", str(SMOKE), "--run-name", "bad-data", "--set", f"run.runs_dir={tmp_path}",
                    "--set", f"data.raw_glob={raw}/*.jsonl", "--to", "01")
    assert proc.returncode == 1
    assert f"InvalidData: {raw}/a.jsonl:1: answer: expected a string, got number" in proc.stderr
    assert list((tmp_path / "bad-data" / "01_curate").iterdir()) == []
