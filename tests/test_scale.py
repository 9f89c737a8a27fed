"""01_curate's per-row steps stream a 200k-row file through `datasets` with num_proc=2 (issue: scale)."""

import json
import multiprocessing
import re
import resource
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N_ROWS = 200_000


def _stream(src: Path, out: Path, cache: Path, queue) -> None:
    """Runs in a fresh process, so the peak memory reported is the streaming run's own."""
    from transformers import AutoTokenizer

    from aletheia_utils import config, curate, models

    cfg = config.load(ROOT / "params" / "default.yaml")
    d = cfg.data
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(cfg.run.base_model))
    start = time.perf_counter()
    counts = curate.stream_curate([src], out, tokenizer=tokenizer, min_tokens=d.min_answer_tokens,
                                  max_tokens=d.max_answer_tokens, repeat_overlap_max=d.repeat_overlap_max,
                                  boilerplate=d.boilerplate_patterns, pii_min_score=d.pii_min_score, num_proc=2,
                                  cache_dir=str(cache))
    seconds = time.perf_counter() - start
    peak = max(resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
    queue.put({"counts": counts, "seconds": seconds, "peak_mb": peak})


@pytest.mark.slow
def test_stream_curate_200k_rows(tmp_path, capsys):
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
    out = tmp_path / "clean.jsonl"
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    worker = ctx.Process(target=_stream, args=(src, out, tmp_path / "cache", queue))
    worker.start()
    report = queue.get(timeout=1800)
    worker.join(timeout=60)
    counts, seconds = report["counts"], report["seconds"]
    assert counts["rows_in"] == N_ROWS + 3 and counts["invalid rows"] == 3
    removed = sum(v for k, v in counts.items() if k not in ("rows_in", "rows_out", "pii_spans"))
    assert counts["rows_out"] == counts["rows_in"] - removed
    assert counts["exact_duplicate"] > 0 and counts["pii_spans"] > 0
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == counts["rows_out"]
    rows = [json.loads(line) for line in lines]
    assert len({(r["question"], r["answer"]) for r in rows}) == len(rows)
    assert not any(re.search(r"@example\.(com|org)", r["question"] + r["answer"]) for r in rows)
    with capsys.disabled():
        print(f"\nstream_curate: {N_ROWS} rows ({src.stat().st_size / 2**20:.0f} MiB) in {seconds:.0f} s = "
              f"{N_ROWS / seconds:.0f} rows/s with num_proc=2; peak RSS of one process {report['peak_mb']:.0f} MiB "
              f"(torch and the tokenizer included); {counts}")
