"""Data curation (01_curate): normalize, filter, dedup, split, build the DPO pairs and the data card; the rows
themselves (kinds, validation, files) are `data`'s, the PII scrubber is `pii`'s.

Every step takes a list of row dicts and returns the rows it keeps plus what it removed, so the
notebook can show each step's effect; `Funnel` records the counts.
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from . import data, generation, models, serve
from .pii import PII_PLACEHOLDERS

# ---------------------------------------------------------------- normalization

_CODE = re.compile(r"(```.*?```|`[^`\n]+`)", re.S)
_HTML_BREAK = re.compile(r"<br\s*/?>|</(?:p|div|li|h[1-6]|blockquote|tr)>", re.I)
_HTML_TAG = re.compile(r"</?(?:p|br|div|span|a|b|i|em|strong|u|code|pre|ul|ol|li|h[1-6]|blockquote|table|tr|td|th|"
                       r"hr|img|font|small|sup|sub)(?:\s[^<>]*)?/?>", re.I)
_ENTITY = re.compile(r"&(?:[a-zA-Z]+|#\d+|#x[0-9a-fA-F]+);")
_MD_LINK = re.compile(r"!?\[([^\]\n]+)\]\([^)\s]+\)")
_MD_BOLD = re.compile(r"\*\*([^*\n]+)\*\*")
_FORUM_TRAILER = re.compile(r"\s*(?:-+\s*)?Posted by [\w.-]+(?:\s*\|\s*\d+ (?:upvotes?|points?|likes?))?\s*$", re.I)


def _clean_prose(text: str) -> str:
    text = _HTML_BREAK.sub("\n", text)
    text = _HTML_TAG.sub("", text)
    if _ENTITY.search(text):
        text = html.unescape(text).replace("\u00a0", " ")
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_BOLD.sub(r"\1", text)
    text = re.sub(r"[ \t]+(?=\n)", "", re.sub(r"(?<=\S)[ \t]{2,}", " ", text))
    return re.sub(r"\n{3,}", "\n\n", text)


def normalize_text(text: str) -> str:
    """NFC; outside code spans and fenced blocks: HTML tags/entities, markdown links/bold, runs of blanks and
    empty lines; a trailing forum signature. Code is kept exactly as written."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\u00a0", " ")
    parts = _CODE.split(text)
    text = "".join(p if i % 2 else _clean_prose(p) for i, p in enumerate(parts))
    return _FORUM_TRAILER.sub("", text).strip()


def normalize(rows: list[dict]) -> tuple[list[dict], int]:
    """Rows with normalized question and answer, and how many changed."""
    out, changed = [], 0
    for r in rows:
        q, a = normalize_text(r["question"]), normalize_text(r["answer"])
        changed += (q, a) != (r["question"], r["answer"])
        out.append({**r, "question": q, "answer": a})
    return out, changed


# ---------------------------------------------------------------- quality filters

def repeat_overlap(question: str, answer: str) -> float:
    """Share of the answer's distinct words that are in the question (1.0: the answer adds nothing)."""
    a, q = set(data.words(answer)), set(data.words(question))
    return len(a & q) / len(a) if a else 1.0


def _prototypes(topics: dict[str, str]) -> list[str]:
    """Each topic's description and each of its comma-separated terms, as texts to embed."""
    out = []
    for name, desc in topics.items():
        out.append(f"{name.replace('_', ' ')}: {desc}")
        out += [t.strip() for t in re.split(r",|\band\b", desc) if t.strip()]
    return out


def relevance(rows: list[dict], topics: dict[str, str], offtopic: dict[str, str], embed) -> list[float]:
    """Domain relevance margin: how much closer a row is to the domain's topics than to everyday subjects.

    The margin (cosine to the nearest domain prototype minus cosine to the nearest off-topic prototype)
    is averaged over two views, the question alone and question + answer start. Positive: on topic.
    """
    import numpy as np

    inside, outside = embed(_prototypes(topics)), embed(_prototypes(offtopic))
    margins = []
    for texts in ([r["question"] for r in rows], [f"{r['question']} {r['answer'][:400]}" for r in rows]):
        v = embed(texts)
        margins.append((v @ inside.T).max(1) - (v @ outside.T).max(1))
    return np.mean(margins, axis=0).tolist()


RULE_REASONS = ("boilerplate", "repeats_question", "too_short", "too_long")


@dataclass(frozen=True)
class Rules:
    """The rule filters, one implementation for both paths: `quality_filter` here and the datatrove block in
    `curate_scale`. `reason` names the first rule a row breaks, in the order of `RULE_REASONS`, or "" if none."""

    min_tokens: int
    max_tokens: int
    repeat_overlap_max: float
    boilerplate: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, d) -> Rules:
        """From the params' `data` section."""
        return cls(d.min_answer_tokens, d.max_answer_tokens, d.repeat_overlap_max, tuple(d.boilerplate_patterns))

    @cached_property
    def patterns(self) -> list[re.Pattern]:
        return [re.compile(p, re.M) for p in self.boilerplate]

    def reason(self, question: str, answer: str, answer_tokens: int) -> str:
        if any(p.search(answer) for p in self.patterns):
            return "boilerplate"
        if repeat_overlap(question, answer) >= self.repeat_overlap_max:
            return "repeats_question"
        if answer_tokens < self.min_tokens:
            return "too_short"
        if answer_tokens > self.max_tokens:
            return "too_long"
        return ""


def quality_filter(rows: list[dict], *, tokenizer, embed, topics: dict[str, str], offtopic: dict[str, str],
                   min_tokens: int, max_tokens: int,
                   relevance_min: float, repeat_overlap_max: float, boilerplate: list[str]):
    """Keep rows that pass every filter; removed rows get `reason`. Each row gains `answer_tokens` and, unless
    `embed` is None (the rule filters alone, as at scale), `relevance`."""
    rules = Rules(min_tokens, max_tokens, repeat_overlap_max, tuple(boilerplate))
    lengths = data.token_lengths([r["answer"] for r in rows], tokenizer) if rows else []
    scores = relevance(rows, topics, offtopic, embed) if rows and embed is not None else [None] * len(rows)
    kept, removed = [], []
    for r, n, rel in zip(rows, lengths, scores, strict=True):
        r = {**r, "answer_tokens": n} | ({} if rel is None else {"relevance": round(rel, 4)})
        reason = rules.reason(r["question"], r["answer"], n) or (
            "off_topic" if rel is not None and rel < relevance_min else "")
        if reason:
            removed.append({**r, "reason": reason})
        else:
            kept.append(r)
    return kept, removed


# ---------------------------------------------------------------- dedup

AUTHORED = "aletheia-authored"


def exact_key(question: str, answer: str) -> str:
    """What "the same row" means for dedup: canonical question and answer."""
    return data.canonical(question + "\n" + answer)


def question_key(question: str, answer: str) -> str:
    """What "the same question" means for dedup."""
    return data.canonical(question)


# The exact dedup steps, in the order they run, with the key each compares (both paths use these).
DEDUP_KEYS = {"exact_duplicate": exact_key, "same_question": question_key}


def near_dup_text(question: str, answer: str) -> str:
    """The text near-dedup compares: question and answer together."""
    return question + " " + answer


def shingles(text: str) -> list[str]:
    """The word 3-grams of `text`: what near-dedup's MinHash compares (both paths)."""
    words = data.words(text)
    return [" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))]


def lsh_bands(threshold: float, num_perm: int = 128) -> tuple[int, int]:
    """(bands, rows per band) that datasketch's LSH picks for `threshold`: datatrove's MinHash uses the same."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return lsh.b, lsh.r


def _hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


class _UnionFind:
    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> None:
        a, b = sorted((self.find(i), self.find(j)))
        self.parent[b] = a

    def groups(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        for i in range(len(self.parent)):
            out.setdefault(self.find(i), []).append(i)
        return out


def _minhash(text: str, num_perm: int, seed: int):
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch([s.encode() for s in shingles(text)])
    return m


def dedup(rows: list[dict], near_threshold: float | None, seed: int = 0, num_perm: int = 128):
    """Cluster exact duplicates, same-question rows and near duplicates (MinHash LSH over word 3-grams of
    question + answer; `near_threshold=None` skips them); keep one row per cluster, preferring authored rows, then
    file order.

    Returns (kept, removed); each removed row's `reason` is `exact_duplicate`, `same_question` or
    `near_duplicate`, and `duplicate_of` names the kept row's id.
    """
    from datasketch import MinHashLSH

    order = sorted(range(len(rows)), key=lambda i: (rows[i].get("source") != AUTHORED, i))
    rows = [rows[i] for i in order]
    uf, reason = _UnionFind(len(rows)), {}
    for why, key in DEDUP_KEYS.items():
        first: dict[str, int] = {}
        for i, r in enumerate(rows):
            h = _hash(key(r["question"], r["answer"]))
            if h in first:
                reason.setdefault(i, why)
                uf.union(first[h], i)
            else:
                first[h] = i
    if near_threshold is not None:
        lsh = MinHashLSH(threshold=near_threshold, num_perm=num_perm)
        hashes = [_minhash(near_dup_text(r["question"], r["answer"]), num_perm, seed) for r in rows]
        for i, m in enumerate(hashes):
            for j in lsh.query(m):
                if m.jaccard(hashes[j]) >= near_threshold:
                    uf.union(j, i)
            lsh.insert(i, m)
    kept, removed = [], []
    for members in uf.groups().values():
        keep = min(members)
        kept.append(rows[keep])
        removed += [{**rows[i], "reason": reason.get(i, "near_duplicate"), "duplicate_of": rows[keep]["id"]}
                    for i in members if i != keep]
    kept.sort(key=lambda r: (r["_file"], r["_line"]))
    return kept, removed


# ---------------------------------------------------------------- split

def split(rows: list[dict], fractions: dict[str, float], seed: int, embed=None, group_cosine: float = 0.9):
    """Deterministic train/validation/eval split by seed. Rows whose questions are paraphrases
    (embedding cosine >= `group_cosine`) form one group, and a group never straddles two splits."""
    uf = _UnionFind(len(rows))
    if embed is not None and len(rows) > 1:
        import numpy as np

        vecs = embed([r["question"] for r in rows])
        sims = np.triu(vecs @ vecs.T, k=1)
        for i, j in zip(*np.nonzero(sims >= group_cosine), strict=True):
            uf.union(int(i), int(j))
    groups = sorted(uf.groups().values(), key=lambda g: rows[g[0]]["id"])
    random.Random(seed).shuffle(groups)
    targets = {name: round(frac * len(rows)) for name, frac in fractions.items() if name != "train"}
    out: dict[str, list[dict]] = {"train": [], **{name: [] for name in targets}}
    for g in groups:
        name = next((n for n, t in targets.items() if len(out[n]) < t), "train")
        out[name] += [rows[i] for i in g]
    return out


# ---------------------------------------------------------------- DPO pairs

def degrade(answer: str, topic: str, rng: random.Random) -> tuple[str, str]:
    """A worse answer made from a good one: (text, how). Truncated, generic, or with changed numbers."""
    sentences = re.split(r"(?<=[.!?])\s+", answer.strip())
    numbers = re.findall(r"\b\d+\b", answer)
    choices = ["generic"] + (["truncated"] if len(sentences) > 1 else []) + (["wrong_detail"] if numbers else [])
    how = rng.choice(choices)
    if how == "truncated":
        return sentences[0], how
    if how == "wrong_detail":
        return re.sub(r"\b\d+\b", lambda m: str(int(m.group()) * 3 + 7), answer), how
    subject = topic.replace("_", " ")
    return (f"It depends on your setup. {subject.capitalize()} questions like this usually come down to "
            "configuration, so check the documentation and try a few settings until it works."), how


def base_model_answers(prompts: list[str], base_model: str, max_tokens: int, threads: int | None = None,
                       parallel: int = 4, style: str = "chat_template") -> list[str]:
    """The base model's own greedy answers (no repetition penalty: its loops are what DPO should reject), prompted
    in `style` (`data.prompt_format`): for the embedded GGUF, llama.cpp's `llama-server` decoding `parallel` prompts
    together (continuous batching, the fast path on a CPU); else transformers `generate` in batches (GPU)."""
    if base_model.startswith("embedded:"):
        gguf = models.embedded_gguf(base_model.removeprefix("embedded:"))
        with serve.llama_server(gguf, parallel=parallel, threads=threads) as server:
            answers = generation.server_answers(server, prompts, max_new_tokens=max_tokens, concurrency=parallel,
                                                style=style)[0]
            failed = [p for p, a in zip(prompts, answers, strict=True) if a is None]
            if failed:
                raise RuntimeError(f"llama-server failed {len(failed)} of {len(prompts)} base-model answers (first: "
                                   f"{failed[0][:80]!r}); last lines of its log:\n{server.log_tail()}")
        return [a.text for a in answers]
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = models.load(base_model, dtype=torch.bfloat16 if device == "cuda" else None, device=device)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return [a.text for a in generation.hf_answers(model, tok, prompts, style, max_new_tokens=max_tokens)]


def dpo_pairs(rows: list[dict], rejected: list[tuple[str, str]]) -> list[dict]:
    """{prompt, chosen, rejected, rejected_source}; pairs whose rejected equals chosen are dropped."""
    return [{"id": r["id"], "prompt": r["question"], "chosen": r["answer"], "rejected": text, "rejected_source": how}
            for r, (text, how) in zip(rows, rejected, strict=True) if text.strip() and text.strip() != r["answer"]]


def preference_pairs(rows: list[dict], source: str, base_model: str, max_tokens: int, seed: int,
                     threads: int | None = None, parallel: int = 4, style: str = "chat_template") -> list[dict]:
    """DPO pairs for `rows`: the curated answer is chosen; rejected is the base model's own answer to the prompt in
    `style` (`source="base_model"`, `parallel` llama-server slots) or a degraded copy of the curated one
    (`"degraded"`)."""
    if source == "base_model":
        answers = base_model_answers([r["question"] for r in rows], base_model, max_tokens, threads, parallel, style)
        return dpo_pairs(rows, [(a, "base_model") for a in answers])
    rng = random.Random(seed)
    return dpo_pairs(rows, [degrade(r["answer"], r["topic"], rng) for r in rows])


# ---------------------------------------------------------------- funnel and data card

@dataclass
class Funnel:
    """Rows in, rows removed per filter, rows out, in the order the steps ran."""

    rows_in: int = 0
    steps: list[tuple[str, int]] = field(default_factory=list)

    def remove(self, step: str, n: int) -> None:
        self.steps.append((step, n))

    @property
    def rows_out(self) -> int:
        return self.rows_in - sum(n for _, n in self.steps)

    def table(self) -> list[dict]:
        left, out = self.rows_in, [{"step": "raw rows", "removed": 0, "remaining": self.rows_in}]
        for step, n in self.steps:
            left -= n
            out.append({"step": step, "removed": n, "remaining": left})
        return out


def sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """At most `n` rows, drawn by seed, in their original order."""
    if n is None or n >= len(rows):
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), n))
    return [r for i, r in enumerate(rows) if i in keep]


def data_card(*, files: list[Path], funnel: Funnel, pii: Counter, splits: dict[str, int], outputs: dict[str, Path],
              settings: dict, rejected_sources: Counter) -> str:
    """The markdown data card written beside the curated files."""
    lines = ["# Data card: Aletheia systems-engineering Q&A", "",
             "## Sources", "", "| file | rows | sources |", "| --- | --- | --- |"]
    for f in files:
        sources = Counter(json.loads(ln).get("source", "?") for ln in open(f, encoding="utf-8", errors="replace")
                          if ln.strip() and ln.lstrip().startswith("{"))
        lines.append(f"| `{f.name}` | {sum(sources.values())} | "
                     + ", ".join(f"{k} ({v})" for k, v in sorted(sources.items())) + " |")
    lines += ["", "License: written for this project and released under the repository's license (Apache-2.0). "
              "Rows marked `forum-scrape`/`forum-repost` are synthetic dirt made for the curation lesson.", "",
              "## Funnel", "", "| step | removed | remaining |", "| --- | ---: | ---: |"]
    lines += [f"| {r['step']} | {r['removed']} | {r['remaining']} |" for r in funnel.table()]
    lines += ["", "## Filters and thresholds", ""]
    lines += [f"- `{k}`: {v}" for k, v in settings.items()]
    lines += ["", "## Personal data replaced", ""]
    lines += [f"- {k}: {v} span(s) → `{PII_PLACEHOLDERS.get(k, k)}`" for k, v in sorted(pii.items())]
    lines += ["", "## Splits", ""] + [f"- {k}: {v} rows" for k, v in splits.items()]
    lines += ["", "## DPO rejected answers", ""] + [f"- {k}: {v}" for k, v in sorted(rejected_sources.items())]
    lines += ["", "## Files", "", "| file | rows | sha256 |", "| --- | ---: | --- |"]
    for name, path in outputs.items():
        n = sum(1 for _ in open(path, encoding="utf-8"))
        lines.append(f"| `{name}` | {n} | `{data.sha256(path)[:16]}…` |")
    return "\n".join(lines) + "\n"
