"""08_evaluate: task data and bad input, every shipped lm-eval task on the embedded model, the llama.cpp server
backend, the win-rate statistics and the report."""

import importlib.util
import json
import random
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

import aletheia_utils as au
from aletheia_utils import evaluate as ev

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base_dir():
    return Path(au.models.resolve("embedded:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Held-out eval and dpo_val files made from six rows of the shipped corpus."""
    rows, _ = au.curate.load_rows(sorted((ROOT / "data" / "raw").glob("*.jsonl")), "raw", on_invalid="skip")
    rows = [r for r in rows if len(r["answer"].split()) > 40][:6]
    folder = tmp_path_factory.mktemp("curated")
    au.curate.write_jsonl(folder / "eval.jsonl", [{"id": r["id"], "prompt": r["question"], "response": r["answer"]}
                                                  for r in rows])
    rng = random.Random(0)
    au.curate.write_jsonl(folder / "dpo_val.jsonl", [{"prompt": r["question"], "chosen": r["answer"],
                                                      "rejected": au.curate.degrade(r["answer"], r["topic"], rng)[0]}
                                                     for r in rows])
    return folder


@pytest.fixture(scope="module")
def task_data(splits, base_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_data")
    status = ev.build_task_data(splits / "eval.jsonl", splits / "dpo_val.jsonl", out,
                                tokenizer=AutoTokenizer.from_pretrained(base_dir), style="chat_template", seed=0,
                                max_words=20)
    return out, status


def _tm(data_dir, standard=False):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(ev.TASKS_DIR), include_defaults=standard, metadata={"data_dir": str(data_dir)})


def test_task_data_puts_the_reference_at_the_label(task_data, splits):
    out, status = task_data
    assert status == {"aletheia_mc": {"rows": 6, "source": str(splits / "eval.jsonl")},
                      "aletheia_ppl": {"rows": 6, "source": str(splits / "eval.jsonl")},
                      "aletheia_pref": {"rows": 6, "source": str(splits / "dpo_val.jsonl")}}
    heldout = [json.loads(line) for line in (splits / "eval.jsonl").read_text().splitlines()]
    for doc, row in zip(map(json.loads, (out / "mc.jsonl").read_text().splitlines()), heldout, strict=True):
        assert len(doc["choices"]) == 4 and len(set(doc["choices"])) == 4
        assert doc["choices"][doc["label"]] == ev.first_words(row["response"], 20)
        assert row["prompt"] in doc["context"] and doc["context"].endswith("assistant\n")
        assert all(len(c.split()) <= 20 for c in doc["choices"])
    pref = json.loads((out / "pref.jsonl").read_text().splitlines()[0])
    pairs = [json.loads(line) for line in (splits / "dpo_val.jsonl").read_text().splitlines()]
    assert pref["label"] == 0 and pref["choices"] == [pairs[0]["chosen"], pairs[0]["rejected"]]


def test_bad_split_costs_only_its_own_tasks(splits, base_dir, tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q2", "response": \n')
    out = tmp_path / "data"
    (out).mkdir()
    (out / "mc.jsonl").write_text("stale\n")
    status = ev.build_task_data(bad, splits / "dpo_val.jsonl", out, tokenizer=AutoTokenizer.from_pretrained(base_dir),
                                style="chat_template", seed=0, max_words=20)
    assert f"{bad}:2: (row): malformed JSON" in status["aletheia_mc"]["error"]
    assert "error" in status["aletheia_ppl"] and status["aletheia_pref"]["rows"] == 6
    assert not (out / "mc.jsonl").exists(), "no stale task data behind a failure"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    status = ev.build_task_data(empty, tmp_path / "missing.jsonl", out, tokenizer=None, style="markers", seed=0,
                                max_words=20)
    assert "split is empty" in status["aletheia_mc"]["error"]
    assert "missing.jsonl: split not found" in status["aletheia_pref"]["error"]


def test_plan_skips_unknown_missing_and_unreachable_tasks(task_data):
    out, status = task_data
    tasks, skipped = ev.plan_tasks(["aletheia_mc", "aletheia_humaneval", "aletheia_pref", "no_such_task", "hellaswag"],
                                   status | {"aletheia_pref": {"error": "dpo_val.jsonl: split is empty"}},
                                   _tm(out, standard=True))
    assert tasks == ["aletheia_mc", "aletheia_humaneval"]
    assert skipped["no_such_task"] == "lm-eval does not know a task named 'no_such_task'"
    assert skipped["aletheia_pref"] == "no task data: dpo_val.jsonl: split is empty"
    assert skipped["hellaswag"].startswith("not available offline:"), skipped


def test_offline_also_when_datasets_was_imported_first():
    assert datasets.config.HF_DATASETS_OFFLINE is not None
    before = datasets.config.HF_HUB_OFFLINE
    with ev.offline():
        assert datasets.config.HF_HUB_OFFLINE is True
        with pytest.raises(ConnectionError, match="OfflineModeIsEnabled|offline"):
            datasets.load_dataset("Rowan/hellaswag")
    assert datasets.config.HF_HUB_OFFLINE == before


def test_humaneval_scorer_runs_the_packages_sandbox():
    spec = importlib.util.spec_from_file_location("aletheia_task_utils", ev.TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    problem = utils.load_humaneval()["test"][0]
    assert utils.humaneval_results(problem, [problem["canonical_solution"]]) == {"pass@1": 1.0}
    assert utils.humaneval_results(problem, ["    return None\n"]) == {"pass@1": 0.0}


def test_every_shipped_task_on_the_embedded_model(task_data, base_dir, tmp_path):
    out, _ = task_data
    lm = ev.hf_lm(base_dir, batch_size=4)
    (missing := tmp_path / "no_data").mkdir()
    summary = ev.run_tasks(lm, list(ev.OWN_TASKS), _tm(out), limit=2, max_gen_toks=16, out=tmp_path / "base.json",
                           bootstrap_iters=10)
    assert set(summary) == set(ev.OWN_TASKS) and all("metrics" in s for s in summary.values()), summary
    saved = json.loads((tmp_path / "base.json").read_text())
    assert set(saved["results"]) == set(ev.OWN_TASKS) and saved["skipped"] == {}
    for task in ("aletheia_mc", "aletheia_pref"):
        assert 0 <= saved["results"][task]["acc,none"] <= 1 and "acc_norm,none" in saved["results"][task]
    assert saved["results"]["aletheia_ppl"]["word_perplexity,none"] > 1
    assert summary["aletheia_humaneval"]["metrics"]["pass@1"] in (0.0, 0.5, 1.0)
    assert all(s["samples"]["effective"] == 2 for s in summary.values())
    # a task whose data is gone fails alone, with the reason, and no score
    failed = ev.run_tasks(lm, ["aletheia_mc"], _tm(missing), limit=1, max_gen_toks=8, out=tmp_path / "x.json")
    assert "metrics" not in failed["aletheia_mc"] and "task data not found" in failed["aletheia_mc"]["skipped"]
    assert "aletheia_mc" not in json.loads((tmp_path / "x.json").read_text())["results"]


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: model path does not exist"):
        ev.hf_lm(tmp_path / "nope")


def test_llama_server_backend_runs_generation_and_reports_loglikelihood(task_data, base_dir, tmp_path):
    try:
        au.llamacpp.server_binary()
    except au.llamacpp.SetupMissing as e:
        pytest.skip(str(e))
    out, _ = task_data
    gguf = au.models.embedded_gguf("smollm2-135m-instruct")
    with au.serve.llama_server(gguf, api_key="k", parallel=2, ctx_size=1024) as server:
        why = ev.prompt_logprobs_missing(server)
        lm = ev.server_lm(server, base_dir, concurrency=2, max_length=1024, timeout=60)
        summary = ev.run_tasks(lm, ["aletheia_humaneval", "aletheia_mc"], _tm(out), limit=1, max_gen_toks=16,
                               out=tmp_path / "gguf.json", no_loglikelihood=why)
        answers = ev.server_answers(server, ["What does fsync do?"], 8, 1)
    assert why and "prompt tokens" in why  # llama-server returns logprobs of generated tokens only
    assert "metrics" in summary["aletheia_humaneval"], summary
    assert summary["aletheia_mc"] == {"skipped": f"not supported by this backend: {why}"}
    assert isinstance(answers[0], str) and answers[0]
    assert ev.server_answers(server, ["x"], 4, 1) == [None]  # server stopped: no answer, not a crash


def test_shape_and_win_rule():
    text = "# Title\n\n- one\n- two\n1. three\n\n```bash\n# not a heading\nls -l\n```\nDone."
    assert ev.shape(text) == {"words": 17, "list_items": 3, "code_blocks": 1, "headings": 1}
    m = lambda r, e: {"rouge_l": r, "embed_sim": e}  # noqa: E731
    a = [m(0.5, 0.8), m(0.2, 0.2), m(0.5, 0.1), m(0.30, 0.5), None]
    b = [m(0.2, 0.5), m(0.5, 0.8), m(0.2, 0.5), m(0.31, 0.5), m(0.1, 0.1)]
    assert ev.outcomes(a, b, margin=0.02) == [1, -1, 0, 0]  # metrics disagree, or within the margin: tie


def test_win_rate_interval():
    assert ev.win_rate([1, 1, 1, 1], 200, 0) == {"prompts": 4, "wins": 4, "ties": 0, "losses": 0,
                                                      "win_rate": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    w = ev.win_rate([1, 0, -1, 1, 0, 1, -1, 1], 500, 0)
    assert (w["wins"], w["ties"], w["losses"]) == (4, 2, 2) and w["win_rate"] == pytest.approx(0.625)
    assert 0.2 < w["ci_low"] < w["win_rate"] < w["ci_high"] <= 1.0
    assert ev.win_rate([], 100, 0) == {"prompts": 0}


def test_report_tables_links_and_no_invented_scores(tmp_path):
    import matplotlib.pyplot as plt

    paths = au.pipeline.RunPaths(tmp_path)
    (tmp_path / "html").mkdir()
    au.pipeline.write_json(paths.manifest, {"stages": {"01_curate": {"html": "html/01_curate.html"}}})
    results = {"base": {"aletheia_mc": {"metrics": {"acc_norm": 0.25, "acc_norm_stderr": 0.1}}},
               "gguf": {"aletheia_mc": {"skipped": "not supported by this backend: no echo"}}}
    table = ev.headline_table(results)
    assert table == [{"task": "aletheia_mc", "metric": "acc_norm", "base": "0.250 ± 0.100", "gguf": "—"}]
    missing = ev.not_run({"hellaswag": "not available offline"}, {"sft": "not evaluated: no adapter"}, results)
    assert [r["item"] for r in missing] == ["hellaswag", "sft", "gguf / aletheia_mc"]
    fig = au.plots.task_scores(results, ev.HEADLINE)
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "quant_ladder.png").write_bytes(b"from an earlier run")
    report = ev.write_report(paths, {"lm_eval": results}, {"task_scores": fig}, {"Scores": table, "Not run": missing})
    plt.close(fig)
    summary = (report / "summary.md").read_text()
    assert "| aletheia_mc | acc_norm | 0.250 ± 0.100 | — |" in summary and "no echo" in summary
    assert "[01_curate](../html/01_curate.html)" in summary and (report / "task_scores.png").stat().st_size > 1000
    assert json.loads((report / "metrics.json").read_text())["lm_eval"] == results
    assert not list(report.glob(".*tmp*")) and not (report / "quant_ladder.png").exists()
