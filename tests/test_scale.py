"""01_curate's per-row steps stream a 200k-row file through `datasets` with num_proc=2 (issue: scale)."""

import json
import re
import resource
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from aletheia_utils import config, curate, models

ROOT = Path(__file__).resolve().parent.parent
N_ROWS = 200_000


@pytest.mark.slow
def test_stream_curate_200k_rows(tmp_path, capsys):
    cfg = config.load(ROOT / "params" / "default.yaml")
    d = cfg.data
    corpus = [json.loads(line) for f in sorted((ROOT / "data" / "raw").glob("*.jsonl")) for line in open(f)]
    src = tmp_path / "big.jsonl"
    with open(src, "w", encoding="utf-8") as fh:
        for i in range(N_ROWS):
            row = {**corpus[i % len(corpus)], "id": f"s{i}"}
            if i % 10:  # nine in ten rows get a unique question; the rest repeat the corpus exactly
                row["question"] += f" (case {i})"
            fh.write(json.dumps(row) + "\n")
            if i in (10, 20_000, 150_000):
                fh.write('{"id": "broken", "question": \n')
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(cfg.run.base_model))
    out = tmp_path / "clean.jsonl"
    start = time.perf_counter()
    counts = curate.stream_curate([src], out, tokenizer=tokenizer, min_tokens=d.min_answer_tokens,
                                  max_tokens=d.max_answer_tokens, repeat_overlap_max=d.repeat_overlap_max,
                                  boilerplate=d.boilerplate_patterns, pii_min_score=d.pii_min_score, num_proc=2,
                                  cache_dir=str(tmp_path / "cache"))
    seconds = time.perf_counter() - start
    assert counts["rows_in"] == N_ROWS + 3 and counts["invalid rows"] == 3
    removed = sum(v for k, v in counts.items() if k not in ("rows_in", "rows_out", "pii_spans"))
    assert counts["rows_out"] == counts["rows_in"] - removed
    assert counts["exact_duplicate"] > 0 and counts["pii_spans"] > 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == counts["rows_out"]
    rows = [json.loads(line) for line in lines]
    assert len({(r["question"], r["answer"]) for r in rows}) == len(rows)
    assert not any(re.search(r"@example\.(com|org)", r["question"] + r["answer"]) for r in rows)
    peak_mb = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    with capsys.disabled():
        print(f"\nstream_curate: {N_ROWS} rows ({src.stat().st_size / 2**20:.0f} MiB) in {seconds:.0f} s = "
              f"{N_ROWS / seconds:.0f} rows/s with num_proc=2; peak RSS {peak_mb:.0f} MiB; {counts}")
