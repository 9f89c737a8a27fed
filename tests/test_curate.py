"""01_curate's building blocks, and the bad-input contract: exact FILE:LINE messages, nothing written."""

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from aletheia_utils import curate, data, pii

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"id": "t-1", "topic": "networking", "source": "test", "question": "Why does TCP need a handshake?",
        "answer": "It agrees on initial sequence numbers."}


def write_lines(path: Path, lines: list) -> Path:
    with open(path, "wb") as fh:
        for line in lines:
            text = line if isinstance(line, bytes | str) else json.dumps(line)
            fh.write(text if isinstance(text, bytes) else text.encode())
            fh.write(b"\n")
    return path


BAD_CASES = [
    ('{"id": "t-1", "topic": ', "raw", "(row): malformed JSON (Expecting value at column 25)"),
    ({k: v for k, v in GOOD.items() if k != "answer"}, "raw", "answer: missing"),
    ({**GOOD, "question": None}, "raw", "question: null"),
    ({**GOOD, "topic": 7}, "raw", "topic: expected a string, got number"),
    ({**GOOD, "answer": " \t "}, "raw", "answer: empty or whitespace-only"),
    (b'{"id": "t-1", "question": "caf\xe9"}', "raw", "(row): not UTF-8 (byte 0xe9 at column 31)"),
    ("[1, 2]", "raw", "(row): expected a JSON object, got array"),
    ('"just a string"', "sft", "(row): expected a JSON object, got string"),
    ({"prompt": "p", "chosen": "a", "rejected": "b"}, "sft", "(row): looks like a dpo row (chosen, rejected), "
                                                              "expected a sft row"),
    ({"prompt": "p", "response": "r"}, "dpo", "(row): looks like a sft row (response), expected a dpo row"),
    ({"prompt": "p", "chosen": "same", "rejected": " same "}, "dpo", "rejected: identical to chosen"),
]


@pytest.mark.parametrize("line, kind, message", BAD_CASES)
def test_each_bad_row_is_reported_with_file_line_and_field(tmp_path, line, kind, message):
    good = {"raw": GOOD, "sft": {"prompt": "p", "response": "r"},
            "dpo": {"prompt": "p", "chosen": "a", "rejected": "b"}}
    path = write_lines(tmp_path / "in.jsonl", [good[kind], "", line, good[kind]])
    ok, problems = data.validate_file(path, kind)
    assert ok == 2
    assert [str(p) for p in problems] == [f"{path}:3: {message}"]


def test_load_rows_fails_on_any_problem_or_skips_with_reasons(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [GOOD, {**GOOD, "answer": None}, "{oops"])
    with pytest.raises(data.InvalidData) as err:
        data.load_rows([path], "raw")
    assert str(err.value).splitlines() == [f"{path}:2: answer: null",
                                           f"{path}:3: (row): malformed JSON (Expecting property name enclosed "
                                           "in double quotes at column 2)"]
    rows, rejected = data.load_rows([path], "raw", on_invalid="skip")
    assert [r["id"] for r in rows] == ["t-1"] and rows[0]["_line"] == 1
    assert [(r["line"], r["reasons"]) for r in rejected] == [(2, ["answer: null"]), (3, [rejected[1]["reasons"][0]])]


def test_validate_data_command_exit_codes(tmp_path):
    good = write_lines(tmp_path / "good.jsonl", [{"prompt": "p", "response": "r"}])
    bad = write_lines(tmp_path / "bad.jsonl", [{"prompt": "p", "response": ""}])
    run = [sys.executable, "-m", "aletheia_utils.cli", "validate-data"]
    ok = subprocess.run([*run, str(good), "--kind", "sft"], capture_output=True, text=True)
    assert ok.returncode == 0 and "1 valid sft row(s), 0 problem(s)" in ok.stdout
    no = subprocess.run([*run, str(bad), "--kind", "sft"], capture_output=True, text=True)
    assert no.returncode == 2 and no.stderr.strip() == f"{bad}:1: response: empty or whitespace-only"
    (empty := tmp_path / "empty.jsonl").write_text("\n  \n")
    none = subprocess.run([*run, str(empty), "--kind", "sft"], capture_output=True, text=True)
    assert none.returncode == 2 and none.stderr.strip() == f"{empty}: empty: no sft rows (blank lines only or no lines)"
    assert none.stdout.strip() == f"{empty}: 0 valid sft row(s), 1 problem(s)"


def test_shipped_raw_corpus_is_valid_and_large_enough():
    files = sorted((ROOT / "data" / "raw").glob("*.jsonl"))
    rows, _ = data.load_rows(files, "raw")
    authored = [r for r in rows if r["source"] == "aletheia-authored"]
    assert len(authored) >= 500 and len({r["id"] for r in rows}) == len(rows)
    words = [len(r["answer"].split()) for r in authored]
    assert 60 <= min(words) and max(words) <= 400
    assert len({r["topic"] for r in authored}) == 12


def test_normalize_removes_debris_and_keeps_code():
    text = ('<div class="post"><p>Use <b>ss</b>&nbsp;&amp; see [the docs](http://example.com/x).</p><br/>'
            "**Edit:** works</div>\n```\nls  -l   # two  spaces stay\n```\nPosted by user123 | 5 upvotes")
    assert curate.normalize_text(text) == ("Use ss & see the docs.\n\nEdit: works\n\n```\nls  -l   # two  spaces stay"
                                           "\n```")
    assert curate.normalize_text("e\u0301 x  `a  b`") == "\u00e9 x `a  b`"


def test_pii_is_replaced_by_typed_placeholders_and_configuration_is_kept():
    scrubber = pii.PiiScrubber()
    text = ("Mail jane.doe@example.com, call +1 415-555-0142, host 203.0.113.7, key "
            "sk-live-4f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c and ghp_" + "a1" * 18 + ". Keep 127.0.0.1, 10.0.0.0/8, "
            "::1 and zfs_arc_max=17179869184.")
    out, counts = scrubber.scrub(text)
    assert counts == Counter({"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1, "IP_ADDRESS": 1, "API_KEY": 2})
    assert "<EMAIL>" in out and "<PHONE>" in out and "<IP_ADDRESS>" in out and out.count("<API_KEY>") == 2
    for kept in ("127.0.0.1", "10.0.0.0/8", "::1", "17179869184"):
        assert kept in out


def _row(i, q, a, source="aletheia-authored"):
    return {"id": f"r{i}", "topic": "t", "source": source, "question": q, "answer": a, "_file": "f", "_line": i}


def test_dedup_keeps_one_per_cluster_preferring_authored():
    base = ("Use ss -ltnp to list listening TCP sockets together with the owning process and its PID. If you "
            "already know the port, lsof -iTCP:8080 -sTCP:LISTEN answers directly. Both commands need root to "
            "show processes that belong to other users, so run them with sudo on a shared host. In a container, "
            "run them inside the network namespace of the pod, for example with nsenter -t PID -n, because the "
            "host sees only the published ports and not the sockets the application opened inside.")
    rows = [_row(1, "Who scrapes?", base.replace("sudo", "doas"), "forum-scrape"),
            _row(2, "Which process listens on port 8080?", base),
            _row(3, "Which process listens on port 8080?", base, "forum-scrape"),
            _row(4, "How do I find the process holding a port?", base + " Add -n to skip DNS.", "forum-scrape"),
            _row(5, "Which process listens on port 8080?", "Another answer entirely, about something else.",
                 "forum-scrape"),
            _row(6, "What is a page cache?", "The kernel keeps recently read file pages in RAM.")]
    kept, removed = curate.dedup(rows, near_threshold=0.6)
    assert sorted(r["id"] for r in kept) == ["r2", "r6"]
    assert {r["id"]: (r["reason"], r["duplicate_of"]) for r in removed} == {
        "r1": ("near_duplicate", "r2"), "r3": ("exact_duplicate", "r2"), "r4": ("near_duplicate", "r2"),
        "r5": ("same_question", "r2")}
    distinct = [_row(7, "What is a TLB?", base.replace("ss", "x").replace("lsof", "y").replace("root", "z")[:120])]
    assert len(curate.dedup(rows[5:] + distinct, near_threshold=0.6)[0]) == 2


def test_split_is_deterministic_sized_and_keeps_groups_together():
    rows = [_row(i, f"question number {i}", "a") for i in range(100)]
    fractions = {"train": 0.8, "validation": 0.1, "eval": 0.1}

    def fake_embed(texts):  # questions 0-9 are paraphrases of each other
        import numpy as np

        v = np.zeros((len(texts), 101))
        for k, t in enumerate(texts):
            i = int(t.split()[-1])
            v[k, 100 if i < 10 else i] = 1.0
        return v

    a = curate.split(rows, fractions, seed=1, embed=fake_embed)
    b = curate.split(rows, fractions, seed=1, embed=fake_embed)
    assert a == b and {k: len(v) for k, v in a.items()}["train"] >= 78
    homes = {name for name, part in a.items() for r in part if int(r["id"][1:]) < 10}
    assert len(homes) == 1
    assert curate.split(rows, fractions, seed=2, embed=fake_embed) != a


def test_contamination_check_is_on_canonical_text():
    assert data.contaminated(["What is  TCP?", "Other"], ["what is tcp"]) == ["What is  TCP?"]


def test_degrade_always_differs_and_says_how():
    rng = random.Random(0)
    answer = "Set vm.swappiness to 10. Then reboot after 5 minutes."
    seen = set()
    for _ in range(30):
        text, how = curate.degrade(answer, "memory", rng)
        assert text != answer and how in {"truncated", "generic", "wrong_detail"}
        seen.add(how)
    assert seen == {"truncated", "generic", "wrong_detail"}
    pairs = curate.dpo_pairs([_row(1, "q", "a")], [("a", "generic")])
    assert pairs == [], "a pair whose rejected equals chosen is dropped"


def test_funnel_table():
    f = curate.Funnel(rows_in=10)
    f.remove("too_short", 3)
    f.remove("near_duplicate", 2)
    assert f.rows_out == 5 and f.table()[-1] == {"step": "near_duplicate", "removed": 2, "remaining": 5}


@pytest.mark.slow
def test_base_model_rejections_are_greedy_answers_from_llama_server_slots():
    rows = [{**GOOD, "id": f"t-{i}", "question": q} for i, q in enumerate(
        ["What is a mutex?", "What does fsync do?", "What is a TCP handshake?"])]
    pairs = curate.preference_pairs(rows, "base_model", "embedded:smollm2-135m-instruct", max_tokens=12, seed=0,
                                    threads=1)
    assert [p["rejected_source"] for p in pairs] == ["base_model"] * 3
    assert all(p["rejected"].strip() and p["rejected"] != p["chosen"] for p in pairs)
    again = curate.base_model_answers([r["question"] for r in rows], "embedded:smollm2-135m-instruct", 12,
                                      threads=1, parallel=1)
    assert again == [p["rejected"] for p in pairs]  # greedy: batching the slots does not change the answers
