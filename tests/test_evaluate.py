"""08_evaluate: task data and bad input, every shipped lm-eval task on the embedded model, the llama.cpp server
backend, DPO's implicit reward from lm-eval's logged samples, the answer metrics, the paired differences and the
verdict on constructed inputs, the win rule and the report."""

import importlib.util
import json
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
from lm_eval.api.model import LM
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
    rows, _ = au.data.load_rows(sorted((ROOT / "data" / "raw").glob("*.jsonl")), "raw", on_invalid="skip")
    rows = [r for r in rows if len(r["answer"].split()) > 40][:6]
    folder = tmp_path_factory.mktemp("curated")
    au.data.write_jsonl(folder / "eval.jsonl", [{"id": r["id"], "prompt": r["question"], "response": r["answer"]}
                                                for r in rows])
    rng = random.Random(0)
    au.data.write_jsonl(folder / "dpo_val.jsonl", [{"prompt": r["question"], "chosen": r["answer"],
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
    tasks, skipped = ev.plan_tasks(["aletheia_mc", "aletheia_humaneval"], status, _tm(out),
                                   {"aletheia_humaneval": "scores 0 here", "aletheia_humaneva": "a typo"})
    assert tasks == ["aletheia_mc"]
    assert skipped == {"aletheia_humaneval": "skipped by eval.skip_tasks: scores 0 here",
                       "aletheia_humaneva": "lm-eval does not know a task named 'aletheia_humaneva'"}


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


@pytest.mark.slow
def test_every_shipped_task_on_the_embedded_model(task_data, base_dir, tmp_path):
    out, _ = task_data
    lm = ev.hf_lm(base_dir, batch_size=4)
    (missing := tmp_path / "no_data").mkdir()
    summary = ev.run_tasks(lm, list(ev.OWN_TASKS), _tm(out), limit=2, max_gen_toks=16, out=tmp_path / "base.json",
                           bootstrap_iters=10)
    assert set(summary) == set(ev.OWN_TASKS) and all("metrics" in s for s in summary.values()), summary
    saved = json.loads((tmp_path / "base.json").read_text())
    assert set(saved["results"]) == set(ev.OWN_TASKS) and saved["skipped"] == {}
    for task, name in (("aletheia_mc", "mc.jsonl"), ("aletheia_pref", "pref.jsonl")):  # acc as the model ranks them
        docs = [json.loads(line) for line in (out / name).read_text().splitlines()[:2]]
        assert saved["results"][task]["acc,none"] == pytest.approx(_expected_acc(lm, docs)), task
    assert saved["results"]["aletheia_ppl"]["word_perplexity,none"] > 1
    assert set(summary["aletheia_humaneval"]["metrics"]) >= {"pass@1"}  # its scoring: test_scores_follow_the_answers
    assert all(s["samples"]["effective"] == 2 for s in summary.values())
    # a task whose data is gone fails alone, with the reason, and no score
    failed = ev.run_tasks(lm, ["aletheia_mc"], _tm(missing), limit=1, max_gen_toks=8, out=tmp_path / "x.json")
    assert "metrics" not in failed["aletheia_mc"] and "task data not found" in failed["aletheia_mc"]["skipped"]
    assert "aletheia_mc" not in json.loads((tmp_path / "x.json").read_text())["results"]


def _expected_acc(lm, docs) -> float:
    """The share of `docs` whose labelled choice gets the highest log-likelihood from `lm` after the context."""
    from lm_eval.api.instance import Instance

    right = 0
    for doc in docs:
        requests = [Instance("loglikelihood", doc, (doc["context"], c), i) for i, c in enumerate(doc["choices"])]
        scores = [ll for ll, _ in lm.loglikelihood(requests)]
        right += scores.index(max(scores)) == doc["label"]
    return right / len(docs)


class ScriptedLM(LM):
    """An lm-eval model that answers from the answer key: the labelled choice gets the highest log-likelihood and each
    HumanEval prompt its canonical solution (`right`), or every other choice and a wrong body (not `right`)."""

    def __init__(self, right: bool, key: set[tuple[str, str]], solutions: dict[str, str]):
        super().__init__()
        self.right, self.key, self.solutions = right, key, solutions

    def loglikelihood(self, requests):
        return [(0.0 if (r.args in self.key) == self.right else -10.0, False) for r in requests]

    def loglikelihood_rolling(self, requests):
        return [-float(len(r.args[0])) for r in requests]

    def generate_until(self, requests):
        return [self.solutions[r.args[0]] if self.right else "    return None\n" for r in requests]


def test_scores_follow_the_answers(task_data, tmp_path):
    """acc, acc_norm and pass@1 are 1 for a model that answers from the key and 0 for one that never does."""
    out, _ = task_data
    key = {(d["context"], d["choices"][d["label"]]) for name in ("mc.jsonl", "pref.jsonl")  # (context, right answer)
           for d in map(json.loads, (out / name).read_text().splitlines())}
    spec = importlib.util.spec_from_file_location("aletheia_task_utils", ev.TASKS_DIR / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    solutions = {p["prompt"]: p["canonical_solution"] for p in utils.load_humaneval()["test"]}
    tasks = ["aletheia_mc", "aletheia_pref", "aletheia_humaneval"]
    for right, expected in ((True, 1.0), (False, 0.0)):
        summary = ev.run_tasks(ScriptedLM(right, key, solutions), tasks, _tm(out), limit=2, max_gen_toks=16,
                               out=tmp_path / f"{right}.json", bootstrap_iters=10)
        scores = {t: summary[t].get("metrics", summary[t]) for t in tasks}
        assert {t: (m.get("acc"), m.get("acc_norm"), m.get("pass@1")) for t, m in scores.items()} == {
            "aletheia_mc": (expected, expected, None), "aletheia_pref": (expected, expected, None),
            "aletheia_humaneval": (None, None, expected)}, summary


def test_missing_model_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nope'}: model path does not exist"):
        ev.hf_lm(tmp_path / "nope")


@pytest.mark.slow
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
    assert why and "prompt tokens" in why  # llama-server returns logprobs of generated tokens only
    assert "metrics" in summary["aletheia_humaneval"], summary
    assert summary["aletheia_mc"] == {"skipped": f"not supported by this backend: {why}"}


def test_shape_and_win_rule():
    text = "# Title\n\n- one\n- two\n1. three\n\n```bash\n# not a heading\nls -l\n```\nDone."
    assert ev.shape(text) == {"words": 17, "list_items": 3, "code_blocks": 1, "headings": 1}
    m = lambda r, e: {"rouge_l": r, "embed_sim": e}  # noqa: E731
    a = [m(0.5, 0.8), m(0.2, 0.2), m(0.5, 0.1), m(0.30, 0.5), None]
    b = [m(0.2, 0.5), m(0.5, 0.8), m(0.2, 0.5), m(0.31, 0.5), m(0.1, 0.1)]
    assert ev.outcomes(a, b, margin=0.02) == [1, -1, 0, 0]  # metrics disagree, or within the margin: tie


def test_repeated_ngrams_tells_a_loop_from_prose():
    loop = "the cache is full so " * 10  # 50 words, 47 four-grams, 5 distinct
    assert ev.repeated_ngrams(loop) == pytest.approx(1 - 5 / 47)
    assert ev.repeated_ngrams("fsync forces the dirty pages and metadata of a file to stable storage") == 0
    assert ev.repeated_ngrams("too short") == 0


def test_answer_metrics_count_ended_length_and_missing_answers():
    answer = au.generation.Answer
    references = ["one two three four five six seven eight nine ten"] * 3
    answers = [answer("one two three four five", 7, True), answer("one two three " * 10, 32, False), None]
    per = ev.answer_metrics(answers, references, lambda texts: np.full((len(texts), 4), 0.5))  # unit vectors
    assert per[2] is None
    assert (per[0]["ended"], per[0]["tokens"], per[0]["length_ratio"], per[0]["repeated_4grams"]) == (1.0, 7, 0.5, 0)
    assert (per[1]["ended"], per[1]["tokens"], per[1]["length_ratio"]) == (0.0, 32, 3.0)
    assert per[1]["repeated_4grams"] > 0.8 and per[0]["embed_sim"] == pytest.approx(1.0)
    assert per[0]["rouge_l"] > per[1]["rouge_l"] > 0
    summary = ev.summarize(per)
    assert (summary["answered"], summary["ended"], summary["length_ratio"]) == (2, 0.5, 1.75)


def test_sample_mean_averages_each_prompt_over_its_answered_samples():
    first = [{"rouge_l": 0.2, "ended": 1.0}, None, None]
    second = [{"rouge_l": 0.4, "ended": 0.0}, {"rouge_l": 0.1, "ended": 1.0}, None]
    per = ev.sample_mean([first, second])
    assert per[0] == pytest.approx({"rouge_l": 0.3, "ended": 0.5})
    assert per[1] == {"rouge_l": 0.1, "ended": 1.0} and per[2] is None
    with pytest.raises(ValueError):  # every sample run answers the same prompts
        ev.sample_mean([first, second[:2]])


def test_per_prompt_metrics_average_each_prompt_over_its_sample_runs():
    answer = au.generation.Answer
    runs = [[answer("one two three four", 5, True), None], [answer("one two", 3, False), None]]
    per = ev.per_prompt_metrics(runs, ["one two three four"] * 2, lambda texts: np.full((len(texts), 4), 0.5))
    assert per[1] is None, "no sample answered the second prompt"
    assert (per[0]["ended"], per[0]["tokens"], per[0]["length_ratio"]) == (0.5, 4.0, 0.75)
    assert per[0]["rouge_l"] == pytest.approx((1 + 2 / 3) / 2)  # ROUGE-L F1 of the full answer, then of half of it

def _prompts(n=48, seed=1):
    """Per-prompt metrics of a made-up model on `n` prompts."""
    rng = np.random.default_rng(seed)
    return [{"rouge_l": float(r), "embed_sim": float(e), "ended": float(d), "repeated_4grams": float(g),
             "length_ratio": float(x)}
            for r, e, d, g, x in zip(rng.uniform(0.1, 0.3, n), rng.uniform(0.3, 0.7, n), rng.integers(0, 2, n),
                                     rng.uniform(0, 0.5, n), rng.uniform(0.5, 2, n), strict=True)]


def _shifted(rows, shifts):
    """`rows` with `shifts[metric]` (one number, or one per prompt) added."""
    per_prompt = {k: np.broadcast_to(np.asarray(v, dtype=float), len(rows)) for k, v in shifts.items()}
    return [{k: v + float(per_prompt[k][i]) if k in per_prompt else v for k, v in r.items()}
            for i, r in enumerate(rows)]


def test_a_known_difference_is_found():
    base = _prompts()
    tuned = _shifted(base, {"rouge_l": 0.05, "embed_sim": 0.05})
    diffs = ev.paired_differences(tuned, base, ev.COMPARED, 500, 0)
    for k in ("rouge_l", "embed_sim"):
        assert diffs[k]["prompts"] == 48 and diffs[k]["mean"] == pytest.approx(0.05)
        assert 0 < diffs[k]["ci_low"] <= diffs[k]["ci_high"], diffs[k]
    assert diffs["ended"] == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "sd": 0.0, "prompts": 48}
    assert ev.verdict("tuned", "base", diffs)["verdict"] == "better"
    assert ev.verdict("base", "tuned", ev.paired_differences(base, tuned, seed=0))["verdict"] == "worse"
    # the same shift under per-prompt noise: still found, and the interval holds the true shift
    noise = np.random.default_rng(2).normal(0, 0.05, 48)
    noisy = ev.paired_differences(_shifted(base, {"rouge_l": 0.05 + noise, "embed_sim": 0.05 - noise}), base,
                                  ev.VERDICT_METRICS, 1000, 0)
    assert all(0 < d["ci_low"] < 0.05 < d["ci_high"] for d in noisy.values()), noisy


def test_a_zero_difference_is_not_a_win():
    base = _prompts()
    diffs = ev.paired_differences(base, [dict(r) for r in base], ev.COMPARED, 500, 0)
    assert all(d == {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "sd": 0.0, "prompts": 48} for d in diffs.values())
    assert ev.verdict("a", "b", diffs)["verdict"] == "not shown"
    w = ev.win_rate(ev.outcomes(base, base, 0.02), 500, 0)
    assert (w["wins"], w["ties"], w["losses"], w["win_rate"]) == (0, 48, 0, 0.5)


def test_noise_alone_gives_an_interval_across_zero():
    base = _prompts()
    e = np.random.default_rng(3).normal(0, 0.05, 24)
    noise = np.concatenate([e, -e])  # mean exactly 0
    diffs = ev.paired_differences(_shifted(base, {"rouge_l": noise, "embed_sim": noise[::-1]}), base,
                                  ev.VERDICT_METRICS, 1000, 0)
    assert all(d["ci_low"] < 0 < d["ci_high"] and abs(d["mean"]) < 1e-12 for d in diffs.values()), diffs
    assert ev.verdict("a", "b", diffs)["verdict"] == "not shown"


def test_a_small_difference_is_not_shown_and_the_report_says_how_many_prompts_would_show_it():
    base = _prompts()
    e = np.random.default_rng(4).normal(0, 1, 24)
    spread = np.concatenate([e, -e]) / np.concatenate([e, -e]).std(ddof=1) * 0.11  # sd exactly 0.11, mean 0
    diffs = ev.paired_differences(_shifted(base, {"rouge_l": 0.05, "embed_sim": 0.013 + spread}), base,
                                  ev.VERDICT_METRICS, 1000, 0)
    assert diffs["embed_sim"]["sd"] == pytest.approx(0.11) and diffs["embed_sim"]["mean"] == pytest.approx(0.013)
    assert ev.prompts_needed(diffs["embed_sim"]) == 276  # (1.96 · 0.11 / 0.013)² = 275.1
    assert ev.prompts_needed({"mean": 0.0, "sd": 0.1}) is None
    line = ev.verdict("dpo", "base", diffs)["line"]
    assert "not shown" in line and "needs about 276 prompts" in line, line
    tiny = {**diffs, "embed_sim": {**diffs["embed_sim"], "mean": 0.001}}  # (1.96 · 0.11 / 0.001)² ≈ 46,000
    assert ev.verdict("dpo", "base", tiny)["line"].count("needs over ten times these prompts") == 1


def test_only_answered_prompts_are_paired():
    base, tuned = _prompts(6), _prompts(6, seed=2)
    tuned[0], base[5] = None, None
    diffs = ev.paired_differences(tuned, base, ("rouge_l",), 100, 0)
    assert diffs["rouge_l"]["prompts"] == 4
    assert diffs["rouge_l"]["mean"] == pytest.approx(np.mean([tuned[i]["rouge_l"] - base[i]["rouge_l"]
                                                              for i in range(1, 5)]))
    assert ev.paired_differences([None], [base[0]], ("rouge_l",), 100, 0) == {"rouge_l": {"prompts": 0}}


def _d(mean, lo, hi):
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "prompts": 40}


@pytest.mark.parametrize("rouge, embed, expected, reason", [
    (_d(0.02, 0.01, 0.03), _d(0.03, 0.01, 0.05), "better", "dpo's answers are closer to the references than base's"),
    (_d(-0.02, -0.03, -0.01), _d(-0.03, -0.05, -0.01), "worse", "dpo's answers are further from the references"),
    (_d(0.02, 0.01, 0.03), _d(0.01, -0.01, 0.03), "not shown", "at least one interval includes 0"),
    (_d(0.02, 0.01, 0.03), _d(-0.03, -0.05, -0.01), "not shown", "the two metrics point in opposite directions"),
    (_d(0.0, 0.0, 0.0), _d(0.0, 0.0, 0.0), "not shown", "at least one interval includes 0"),
])
def test_verdict_needs_both_intervals_on_one_side_of_zero(rouge, embed, expected, reason):
    v = ev.verdict("dpo", "base", {"rouge_l": rouge, "embed_sim": embed, "ended": _d(0.5, 0.4, 0.6)})
    assert v["verdict"] == expected
    assert v["line"].startswith(f"dpo vs base: **{expected}**: {reason}") and "40 prompts" in v["line"]
    assert f"ROUGE-L {ev.interval(rouge)}, embedding similarity {ev.interval(embed)}" in v["line"]
    assert ev.verdict("dpo", "base", {"rouge_l": {"prompts": 0}, "embed_sim": {"prompts": 0}})["verdict"] == "not shown"
    few = {k: {**x, "prompts": ev.MIN_PROMPTS - 1} for k, x in (("rouge_l", rouge), ("embed_sim", embed))}
    assert ev.verdict("dpo", "base", few)["line"].startswith(
        f"dpo vs base: **not shown**: a verdict needs at least {ev.MIN_PROMPTS} prompts (ROUGE-L")


def test_compare_pairs_and_the_verdict_table():
    base = _prompts()
    per_answer = {"base": base, "dpo": _shifted(base, {"rouge_l": 0.05, "embed_sim": 0.05, "ended": 0.25})}
    comparisons = ev.compare_pairs(per_answer, {"dpo vs base": ("dpo", "base"), "gguf vs base-gguf": ("gguf", "b")},
                                   margin=0.02, samples=200, seed=0)
    c = comparisons["dpo vs base"]
    assert (c["a"], c["b"], c["verdict"]) == ("dpo", "base", "better") and set(c["differences"]) == set(ev.COMPARED)
    assert c["win_rate"]["wins"] == 48, "every prompt moves by 0.05 on both metrics, beyond the 0.02 margin"
    assert comparisons["gguf vs base-gguf"] == {
        "a": "gguf", "b": "b", "verdict": "not compared",
        "line": "gguf vs base-gguf: **not compared**: no answers from gguf and b."}
    rows = ev.verdict_table(comparisons)
    assert rows[0] == {"pair": "dpo vs base", "verdict": "better",
                       "Δ ROUGE-L [95% CI]": "+0.050 [+0.050, +0.050]",
                       "Δ embedding similarity [95% CI]": "+0.050 [+0.050, +0.050]",
                       "Δ ended on its own [95% CI]": "+0.250 [+0.250, +0.250]",
                       "Δ repeated 4-grams [95% CI]": "+0.000 [+0.000, +0.000]", "wins/ties/losses": "48/0/0"}
    assert rows[1]["verdict"] == "not compared" and rows[1]["wins/ties/losses"] == "—"


def test_win_rate_interval():
    assert ev.win_rate([1, 1, 1, 1], 200, 0) == {"prompts": 4, "wins": 4, "ties": 0, "losses": 0,
                                                      "win_rate": 1.0, "ci_low": 1.0, "ci_high": 1.0}
    w = ev.win_rate([1, 0, -1, 1, 0, 1, -1, 1], 500, 0)
    assert (w["wins"], w["ties"], w["losses"]) == (4, 2, 2) and w["win_rate"] == pytest.approx(0.625)
    assert 0.2 < w["ci_low"] < w["win_rate"] < w["ci_high"] <= 1.0
    assert ev.win_rate([], 100, 0) == {"prompts": 0}


class PairLM(LM):
    """An lm-eval model whose log-likelihood of an answer is minus its length in characters / 10 (so the shorter
    answer is likelier), plus `lift[context]` for the chosen answer of a pair (`chosen`: context -> chosen text)."""

    def __init__(self, chosen: dict[str, str], lift: dict[str, float] | None = None):
        super().__init__()
        self.chosen, self.lift = chosen, lift or {}

    def loglikelihood(self, requests):
        out = []
        for context, answer in (r.args for r in requests):
            bonus = self.lift.get(context, 0.0) if self.chosen.get(context) == answer else 0.0
            out.append((-len(answer) / 10 + bonus, False))
        return out

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError


def test_implicit_reward_from_lm_evals_logged_samples(task_data, tmp_path):
    """Through lm-eval itself: a policy that lifts every chosen answer against the reference wins every pair on the
    implicit reward, though both models still rank the (shorter) rejected answer first, so raw accuracy is 0."""
    out, _ = task_data
    docs = [json.loads(line) for line in (out / "pref.jsonl").read_text().splitlines()]
    assert all(len(d["choices"][1]) < len(d["choices"][0]) for d in docs), "the fixture's rejected answers are shorter"
    chosen = {d["context"]: d["choices"][0] for d in docs}
    lift = {d["context"]: 0.5 + 0.25 * i for i, d in enumerate(docs)}
    logged = {}
    for name, lm in (("base", PairLM(chosen)), ("dpo", PairLM(chosen, lift))):
        summary = ev.run_tasks(lm, [ev.PREFERENCE_TASK], _tm(out), limit=None, max_gen_toks=8,
                               out=tmp_path / f"{name}.json", bootstrap_iters=10)
        assert summary[ev.PREFERENCE_TASK]["metrics"]["acc"] == 0.0, summary
        logged[name] = ev.logged_samples(tmp_path / f"{name}.json", ev.PREFERENCE_TASK)
    rewards = ev.implicit_rewards(logged | {"sft": None}, "base", samples=500, seed=0)
    dpo = rewards["dpo"]
    assert (dpo["pairs"], dpo["accuracy"]) == (len(docs), 1.0)
    assert dpo["margin"]["mean"] == pytest.approx(np.mean(list(lift.values())))
    assert 0 < dpo["margin"]["ci_low"] < dpo["margin"]["mean"] < dpo["margin"]["ci_high"]
    assert dpo["verdict"] == "not shown", f"{len(docs)} pairs are fewer than MIN_PROMPTS"
    assert rewards["base"]["verdict"] == "not applicable" and "margin" not in rewards["base"]
    assert rewards["sft"] == {"verdict": "not computed", "why": "no logged aletheia_pref samples from sft"}
    assert ev.logged_samples(tmp_path / "missing.json", ev.PREFERENCE_TASK) is None


def _pref_samples(chosen, rejected, texts=None):
    """lm-eval's logged samples of the preference task with these per-choice log-likelihoods (label 0 = chosen)."""
    texts = texts or [(f"question {i}", f"good {i}", f"bad {i}") for i in range(len(chosen))]
    return [{"doc_id": i, "target": 0, "arguments": [[q, c], [q, r]], "filtered_resps": [[lc, False], [lr, False]]}
            for i, ((q, c, r), lc, lr) in enumerate(zip(texts, chosen, rejected, strict=True))]


def test_implicit_reward_on_constructed_loglikelihoods():
    rng = np.random.default_rng(0)
    ref_c, ref_r = rng.normal(-120, 20, 40), rng.normal(-60, 10, 40)  # the reference prefers every rejected answer
    reference = _pref_samples(ref_c, ref_r)
    lift = rng.uniform(0.5, 3, 40)
    up = ev.implicit_reward(_pref_samples(ref_c + lift, ref_r - 1), reference, 1000, 0)
    assert (up["pairs"], up["accuracy"], up["verdict"]) == (40, 1.0, "better")
    assert up["margin"]["mean"] == pytest.approx(lift.mean() + 1) and up["margin"]["ci_low"] > 0
    same = ev.implicit_reward(_pref_samples(ref_c, ref_r), reference, 1000, 0)
    assert same == {"pairs": 40, "accuracy": 0.0, "margin": {"mean": 0.0, "ci_low": 0.0, "ci_high": 0.0},
                    "verdict": "not shown"}
    down = ev.implicit_reward(_pref_samples(ref_c - lift, ref_r), reference, 1000, 0)
    assert (down["accuracy"], down["verdict"]) == (0.0, "worse") and down["margin"]["ci_high"] < 0
    noise = np.concatenate([lift[:20], -lift[:20]])  # mean margin exactly 0, half the pairs won
    mixed = ev.implicit_reward(_pref_samples(ref_c + noise, ref_r), reference, 1000, 0)
    assert mixed["accuracy"] == 0.5 and mixed["margin"]["ci_low"] < 0 < mixed["margin"]["ci_high"]
    assert mixed["verdict"] == "not shown"
    rows = ev.preference_table({"base": {"verdict": "not applicable", "why": "the reference"}, "dpo": up})
    assert rows[0] == {"model": "base", "verdict": "not applicable (the reference)", "pairs": "—",
                       "preference accuracy": "—", "mean margin [95% CI]": "—"}
    assert rows[1] == {"model": "dpo", "verdict": "better", "pairs": 40, "preference accuracy": "1.000",
                       "mean margin [95% CI]": ev.interval(up["margin"])}


def test_implicit_reward_refuses_samples_that_do_not_pair():
    reference = _pref_samples([-10.0] * 4, [-5.0] * 4)
    with pytest.raises(ValueError, match=r"aletheia_pref: policy and reference scored different pairs; doc ids in "
                                         r"only one of them: \[3\]"):
        ev.implicit_reward(_pref_samples([-9.0] * 3, [-5.0] * 3), reference)
    texts = [(f"question {i}", f"good {i}", f"bad {i}") for i in range(4)]
    texts[1] = ("question 1", "good 1", "another bad answer")
    with pytest.raises(ValueError, match=r"scored different texts for doc ids \[1\]"):
        ev.implicit_reward(_pref_samples([-9.0] * 4, [-5.0] * 4, texts), reference)
    three = _pref_samples([-9.0], [-5.0])
    three[0]["arguments"].append(["question 0", "third"])
    with pytest.raises(ValueError, match="aletheia_pref doc 0: 3 choices logged, a preference pair has 2"):
        ev.implicit_reward(three, reference[:1])


def test_report_opens_with_the_verdict_then_answers_then_tables(tmp_path):
    import matplotlib.pyplot as plt

    paths = au.pipeline.RunPaths(tmp_path)
    (tmp_path / "html").mkdir()
    au.pipeline.write_json(paths.manifest, {"stages": {"01_curate": {"html": "html/01_curate.html"}}})
    results = {"base": {"aletheia_mc": {"metrics": {"acc_norm": 0.25, "acc_norm_stderr": 0.1}},
                        "aletheia_pref": {"metrics": {"acc": 0.0, "acc_norm": 0.0}}},
               "gguf": {"aletheia_mc": {"skipped": "not supported by this backend: no echo"}}}
    table = ev.headline_table(results)
    assert table == [{"task": "aletheia_mc", "metric": "acc_norm", "base": "0.250 ± 0.100", "gguf": "—"}]
    missing = ev.not_run({"hellaswag": "not available offline"}, {"sft": "not evaluated: no adapter"}, results)
    assert [r["item"] for r in missing] == ["hellaswag", "sft", "gguf / aletheia_mc"]
    base = _prompts()
    comparisons = ev.compare_pairs({"base": base, "dpo": _shifted(base, {"rouge_l": 0.05, "embed_sim": 0.05})},
                                   {"dpo vs base": ("dpo", "base"), "gguf vs base-gguf": ("gguf", "base-gguf")},
                                   margin=0.02, samples=200, seed=0)
    answer = au.generation.Answer
    examples = ev.side_by_side(["What does fsync do?"], ["It flushes the file to disk."],
                               {"base": [answer("It writes.", 3, True)], "dpo": [answer("It flushes " * 4, 16, False)],
                                "gguf": [None]})
    decoding = {"max_new_tokens": 320, "sampling": {"repeat_penalty": 1.1, "dry_multiplier": 0.8}}
    preference = {"base": {"verdict": "not applicable", "why": "the reference; its margin against itself is 0"},
                  "dpo": {"pairs": 24, "accuracy": 0.875, "margin": {"mean": 2.5, "ci_low": 1.25, "ci_high": 3.75},
                          "verdict": "better"}}
    measured = {"comparisons": comparisons, "decoding": decoding, "preference": preference,
                "num_prompts": 48, "tie_margin": 0.02, "answers": {"base": {"answered": 48, "rouge_l": 0.123456}},
                "lm_eval": results, "skipped_tasks": {"hellaswag": "not available offline"},
                "models": {"base": "evaluated in 3 s", "sft": "not evaluated: no adapter"},
                "answers_from": {"base": "base-F16.gguf, 9 s", "gguf": "not evaluated: no answers: no server"}}
    au.pipeline.write_json(tmp_path / "06_gguf" / "quants.json", [{"level": "Q4_K_M", "size_bytes": 105_477_120,
                                                                  "bpw": 6.1734, "perplexity": 28.53123,
                                                                  "greedy_agreement": 0.859}])
    figures = {"task_scores": au.plots.task_scores(results, ev.HEADLINE),
               "paired_differences": au.plots.paired_differences(comparisons, {"rouge_l": "ROUGE-L",
                                                                               "ended": "ended"})}
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "quant_ladder.png").write_bytes(b"from an earlier run")
    report = ev.write_report(paths, measured, figures, examples)
    for fig in figures.values():
        plt.close(fig)
    summary = (report / "summary.md").read_text()
    assert [s.split("\n")[0] for s in summary.split("\n## ")[1:4]] == [
        "Verdict: did tuning help?", "Answers side by side", "Answers against the reference (mean per model)"]
    verdict_part = summary.split("\n## ")[1]
    assert "greedily, with at most 320 new tokens and the same sampler fields (repeat_penalty 1.1, " \
           "dry_multiplier 0.8)" in verdict_part
    assert "- dpo vs base: **better**: dpo's answers are closer" in verdict_part
    assert "- gguf vs base-gguf: **not compared**: no answers from gguf and base-gguf." in verdict_part
    assert "| dpo vs base | better | +0.050 [+0.050, +0.050] | +0.050 [+0.050, +0.050] |" in verdict_part
    assert "called 0 of 48 per-prompt comparisons ties" in verdict_part
    assert "**dpo** (16 tokens, cut at the token limit)" in summary and "**gguf**: (no answer)" in summary
    assert "| Q4_K_M | 100.6 | 6.173 | 28.531 | 0.859 |" in summary, "MiB, floats to 3 decimals"
    assert "| base | 48 | 0.123 |" in summary
    assert "| aletheia_mc | acc_norm | 0.250 ± 0.100 | — |" in summary and "no echo" in summary
    assert "| aletheia_pref |" not in summary, "raw choice accuracy on the pairs is not a headline"
    pref_part = summary.split("\n## Held-out preference pairs (aletheia_pref)")[1].split("\n## ")[0]
    assert ev.REWARD_RULE in pref_part
    assert "| base | not applicable (the reference; its margin against itself is 0) | — | — | — |" in pref_part
    assert "| dpo | better | 24 | 0.875 | +2.500 [+1.250, +3.750] |" in pref_part
    assert "[01_curate](../html/01_curate.html)" in summary
    assert "![paired_differences](paired_differences.png)" in summary
    assert (report / "task_scores.png").stat().st_size > 1000 and (report / "paired_differences.png").is_file()
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["lm_eval"] == results and metrics["win_rule"] == ev.WIN_RULE
    assert metrics["preference"] == preference and metrics["reward_rule"] == ev.REWARD_RULE
    assert [r["item"] for r in metrics["not_run"]] == ["hellaswag", "sft", "gguf (answers)", "gguf / aletheia_mc"]
    assert metrics["quant_ladder"] == [{"level": "Q4_K_M", "size_mib": 100.6, "bpw": 6.1734, "perplexity": 28.53123,
                                        "greedy_agreement": 0.859}], "sizes in MiB; the JSON keeps the full values"
    assert not list(report.glob(".*tmp*")) and not (report / "quant_ladder.png").exists()
