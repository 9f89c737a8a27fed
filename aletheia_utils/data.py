"""Rows and files every stage shares: the row kinds and their validation, JSONL files, the curated splits, the
prompt formats, and canonical text (what "the same prompt" means for hashing and contamination checks).

A leaf module: it imports nothing from the package but `files`, so every stage can build on it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from . import files

KINDS = {
    "raw": ("id", "topic", "source", "question", "answer"),
    "sft": ("prompt", "response"),
    "dpo": ("prompt", "chosen", "rejected"),
}
_KIND_MARKERS = {"raw": {"question", "answer"}, "sft": {"response"}, "dpo": {"chosen", "rejected"}}
MARKERS_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
# The same format as a chat template, for a model trained on markers that has none (a pretrained base): chat endpoints
# (transformers serve, llama-server, vLLM) then prompt it as it was trained.
MARKERS_CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ m['content'] + eos_token }}"
                         "{% else %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}{% endif %}"
                         "{% endfor %}")


# ---------------------------------------------------------------- validation

@dataclass(frozen=True)
class Problem:
    path: str
    line: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.reason}"


class InvalidData(ValueError):
    """Bad input rows; the message lists them as `FILE:LINE: field: reason`."""

    def __init__(self, problems: list[Problem], shown: int = 20):
        self.problems = problems
        lines = [str(p) for p in problems[:shown]]
        if len(problems) > shown:
            lines.append(f"… and {len(problems) - shown} more problem(s)")
        super().__init__("\n".join(lines))


def _type_name(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number",
            type(None): "null"}.get(type(value), type(value).__name__)


def check_row(obj, kind: str) -> list[tuple[str, str]]:
    """(field, reason) for everything wrong with one parsed row of `kind`."""
    if not isinstance(obj, dict):
        return [("(row)", f"expected a JSON object, got {_type_name(obj)}")]
    for other, markers in _KIND_MARKERS.items():
        if other != kind and markers <= obj.keys() and not _KIND_MARKERS[kind] & obj.keys():
            return [("(row)", f"looks like a {other} row ({', '.join(sorted(markers))}), expected a {kind} row")]
    problems = []
    for name in KINDS[kind]:
        if name not in obj:
            problems.append((name, "missing"))
        elif obj[name] is None:
            problems.append((name, "null"))
        elif not isinstance(obj[name], str):
            problems.append((name, f"expected a string, got {_type_name(obj[name])}"))
        elif not obj[name].strip():
            problems.append((name, "empty or whitespace-only"))
    if kind == "dpo" and not problems and obj["chosen"].strip() == obj["rejected"].strip():
        problems.append(("rejected", "identical to chosen"))
    return problems


def parse_line(raw: bytes, path: str, n: int, kind: str) -> tuple[dict | None, str, list[Problem]]:
    """One line of a JSONL file: (row or None, the line as text, problems). Every reader of raw rows uses this,
    the in-memory one below and the datatrove reader of `curate_scale`."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, raw.decode("utf-8", "replace"), [
            Problem(path, n, "(row)", f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")]
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        column = e.pos + 1  # 1-based character column in this line
        return None, line, [Problem(path, n, "(row)", f"malformed JSON ({e.msg} at column {column})")]
    problems = [Problem(path, n, f, r) for f, r in check_row(obj, kind)]
    return (None if problems else obj), line, problems


def read_jsonl(path: str | Path, kind: str) -> Iterator[tuple[int, dict | None, str, list[Problem]]]:
    """Stream a JSONL file: (line number, row or None, raw line, problems). Blank lines are skipped."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    with open(path, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            if not raw.decode("utf-8", "replace").strip():
                continue
            row, line, problems = parse_line(raw, str(path), n, kind)
            yield n, row, line, problems


def validate_file(path: str | Path, kind: str) -> tuple[int, list[Problem]]:
    """(valid row count, problems) for one file; `aletheia validate-data` prints the problems."""
    ok, problems = 0, []
    for _, row, _, probs in read_jsonl(path, kind):
        ok += row is not None
        problems += probs
    return ok, problems


def load_rows(files: Iterable[str | Path], kind: str, on_invalid: str = "fail") -> tuple[list[dict], list[dict]]:
    """All valid rows of `files` (with `_file`/`_line`) and the rejected ones with their reasons.

    With `on_invalid="fail"` any problem raises `InvalidData` before the caller writes anything.
    """
    rows, rejected, problems = [], [], []
    for path in files:
        for n, row, line, probs in read_jsonl(path, kind):
            if probs:
                problems += probs
                rejected.append({"file": str(path), "line": n, "reasons": [f"{p.field}: {p.reason}" for p in probs],
                                 "text": line.rstrip("\n")})
            else:
                rows.append({**row, "_file": str(path), "_line": n})
    if problems and on_invalid == "fail":
        raise InvalidData(problems)
    return rows, rejected


# ---------------------------------------------------------------- curated splits

class SplitError(ValueError):
    """A curated split that cannot be used (missing, invalid or empty); raised before anything uses it."""


def load_split(path: Path, kind: str) -> list[dict]:
    """Rows of a curated split, validated; a missing, invalid or empty split is a `SplitError`."""
    if not path.is_file():
        raise SplitError(f"{path}: split not found (run 01_curate first)")
    ok, problems = validate_file(path, kind)
    if problems:
        raise SplitError(str(InvalidData(problems)))
    if ok == 0:
        raise SplitError(f"{path}: split is empty")
    rows, _ = load_rows([path], kind)
    return rows


# ---------------------------------------------------------------- files

def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    """Write rows (without `_`-prefixed bookkeeping keys) atomically; return the count."""
    n = 0
    with files.atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
            n += 1
    return n


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- text

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """The lower-cased words (letters and digits) of `text`."""
    return _WORD.findall(text.lower())


def canonical(text: str) -> str:
    """Lower case, words only: what 'the same text' means for hashing."""
    return " ".join(words(text))


def contaminated(train_prompts: Iterable[str], heldout_prompts: Iterable[str]) -> list[str]:
    """Train prompts whose canonical text equals a held-out prompt."""
    held = {canonical(p) for p in heldout_prompts}
    return [p for p in train_prompts if canonical(p) in held]


def token_lengths(texts: list[str], tokenizer) -> list[int]:
    """Tokens per text, special tokens not counted."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


# ---------------------------------------------------------------- prompt formats

def format_prompt(prompt: str, style: str, tokenizer=None) -> str:
    """The text a model sees before its answer: the seed's `### Instruction:` markers or the chat template."""
    if style == "markers":
        return MARKERS_TEMPLATE.format(prompt=prompt)
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def format_example(prompt: str, response: str, style: str, tokenizer) -> str:
    """Prompt and response as one training text, ending with the end-of-turn token."""
    if style == "markers":
        return format_prompt(prompt, style) + response + tokenizer.eos_token
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
