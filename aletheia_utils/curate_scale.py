"""01_curate past one machine: validation, normalization, the rule filters, PII scrubbing, exact dedup and MinHash
near-dedup as a datatrove pipeline, on files larger than memory, with a local, Ray or Slurm executor.

The custom steps are datatrove blocks that call the functions 01 teaches (`data.parse_line`,
`curate.normalize_text`, `curate.Rules`, `pii.PiiScrubber`, `curate.DEDUP_KEYS`, `curate.shingles`): one
implementation of each rule. Dedup is datatrove's own multi-stage blocks, on disk: exact duplicates and same-question
rows by `ExactDedupSignature` → `ExactFindDedups` → `ExactDedupFilter`, near duplicates by `MinhashDedupSignature` →
`MinhashDedupBuckets` → `MinhashDedupCluster` (here keeping authored rows, as 01 does) → `MinhashDedupFilter`.
Relevance and the split stay in memory (01): they run on the curated corpus, not on a raw crawl.

Everything lands under one output folder: `kept/` (the curated rows), `removed/<reason>/` (each removed row, by
reason), `rejected/` (invalid lines with `FILE:LINE` reasons), `logs/<stage>/` (datatrove's logs, per-block stats and
completed-task markers: a rerun skips finished tasks), `work/` (intermediate rows, signatures) and `summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from datatrove.data import Document
from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import (
    ExactDedupConfig,
    ExactDedupFilter,
    ExactDedupSignature,
    ExactFindDedups,
)
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.word_tokenizers import WordTokenizer
from loguru import logger

from . import config, curate, data, files, models
from .pii import PiiScrubber

HASHES = HashConfig(precision=64, hash_fc="sha1")  # sha1: no xxhash dependency
ROW_FIELDS = ("id", "topic", "source", "question", "answer", "answer_tokens", "pii", "file", "line")
REASONS = ("invalid rows", *curate.RULE_REASONS, *curate.DEDUP_KEYS, "near_duplicate")


class ExecutorUnavailable(RuntimeError):
    """The configured executor cannot start (no Ray cluster at the address, no Slurm); one sentence."""


class StageFailed(RuntimeError):
    """A stage ended with tasks not completed; the message names the stage and its log folder."""


# ---------------------------------------------------------------- rows as datatrove documents

def _document(row: dict, path: str, line: int) -> Document:
    """A raw row as a Document: the answer is its text; question and the rest are metadata."""
    return Document(text=row["answer"], id=row["id"],
                    metadata={"question": row["question"], "topic": row["topic"], "source": row["source"],
                              "file": path, "line": line})


class RowWriter(JsonlWriter):
    """Rows as uncompressed JSONL, one file per task: the raw schema plus answer_tokens, pii, file and line; removed
    rows go to `folder/<reason>/` with their `reason` (fixed, or the rule filter's in the row's metadata)."""

    name = "🐿 rows"

    def __init__(self, folder: str | Path, reason: str | None = None, filename: str = "${rank}.jsonl"):
        super().__init__(str(folder), output_filename=f"{reason}/{filename}" if reason else filename, compression=None)
        self.reason = reason

    def _default_adapter(self, doc: Document) -> dict:
        out = {"id": doc.id, "answer": doc.text} | {k: doc.metadata[k] for k in ROW_FIELDS if k in doc.metadata}
        reason = self.reason or doc.metadata.get("reason")
        return {k: out[k] for k in ROW_FIELDS if k in out} | ({"reason": reason} if reason else {})


class RejectedWriter(JsonlWriter):
    """Invalid lines, in the shape of `data.load_rows`' rejected rows: file, line, reasons, text."""

    name = "🐿 rejected lines"

    def __init__(self, folder: str | Path):
        super().__init__(str(folder), output_filename="${rank}.jsonl", compression=None)

    def _default_adapter(self, doc: Document) -> dict:
        return {k: doc.metadata[k] for k in ("file", "line", "reasons")} | {"text": doc.text}


def row_reader(folder: str | Path) -> JsonlReader:
    """Reads back rows `row_writer` wrote, as the same documents."""
    return JsonlReader(str(folder), glob_pattern="*.jsonl", recursive=False, compression=None, text_key="answer",
                       add_file_path=False)


# ---------------------------------------------------------------- blocks calling 01's functions

class RawReader(BaseDiskReader):
    """Raw Q&A rows (`data.KINDS["raw"]`) from JSONL files, each line checked by `data.parse_line`: invalid lines
    (malformed JSON, non-UTF-8 bytes, a wrong kind, missing or empty fields) go to `rejected` with their
    `FILE:LINE: field: reason`; with `fail=True` a task that met any raises once its shard is read.

    Sharding: with at least as many files as tasks, each task reads whole files; otherwise each file is cut into one
    byte range per task (at line starts), so a single large file still spreads over every worker."""

    name = "📖 raw Q&A (validated)"

    def __init__(self, data_folder: str, glob_pattern: str, rejected: JsonlWriter, fail: bool = False):
        super().__init__(data_folder, glob_pattern=glob_pattern, recursive=False, add_file_path=False)
        self.rejected = rejected
        self.fail = fail
        self.problems = 0

    def read_file(self, filepath: str):  # whole-file reads go through read_range
        yield from self.read_range(filepath, 0, None, rank=0)

    def _shard(self, rank: int, world_size: int) -> list[tuple[str, int, int | None]]:
        files = sorted(self.data_folder.list_files(recursive=False, glob_pattern=self.glob_pattern))
        if not files:
            raise FileNotFoundError(f"no input files match {self.glob_pattern} in {self.data_folder.path}")
        if len(files) >= world_size:
            return [(f, 0, None) for f in files[rank::world_size]]
        out = []
        for f in files:
            size = self.data_folder.size(f)
            out.append((f, rank * size // world_size, (rank + 1) * size // world_size))
        return out

    def read_range(self, filepath: str, start: int, end: int | None, rank: int):
        """Documents of the lines that start in bytes [start, end) of `filepath`, with their line numbers."""
        path = self.data_folder.resolve_paths(filepath)
        with self.data_folder.open(filepath, "rb") as fh:
            n = 0
            if start:
                fh.seek(start - 1)
                fh.readline()  # to the first line that starts at or after `start`
                pos = fh.tell()
                fh.seek(0)
                left = pos
                while left:  # line number of that line: newlines before it
                    chunk = fh.read(min(left, 1 << 24))
                    n += chunk.count(b"\n")
                    left -= len(chunk)
            while end is None or fh.tell() < end:
                raw = fh.readline()
                if not raw:
                    break
                n += 1
                if not raw.decode("utf-8", "replace").strip():
                    continue
                with self.track_time():
                    row, line, problems = data.parse_line(raw, path, n, "raw")
                if problems:
                    self.stat_update("invalid rows")
                    self.problems += len(problems)
                    self.rejected.write(Document(text=line.rstrip("\n"), id=f"{path}:{n}", metadata={
                        "file": path, "line": n, "reasons": [f"{p.field}: {p.reason}" for p in problems]}), rank)
                    continue
                yield _document(row, path, n)

    def run(self, data_=None, rank: int = 0, world_size: int = 1):
        self.problems = 0
        with self.rejected:
            for filepath, start, end in self._shard(rank, world_size):
                self.stat_update("input_files")
                for doc in self.read_range(filepath, start, end, rank):
                    self.stat_update("documents")
                    yield doc
        if self.fail and self.problems:
            raise ValueError(f"{self.problems} invalid row(s) in task {rank} (data.on_invalid: fail)")


class Normalize(PipelineStep):
    """`curate.normalize_text` on question and answer."""

    type = "✂️ - FORMAT"
    name = "🧹 normalize (01 §2)"

    def run(self, docs, rank: int = 0, world_size: int = 1):
        for doc in docs:
            with self.track_time():
                q, a = curate.normalize_text(doc.metadata["question"]), curate.normalize_text(doc.text)
            self.stat_update("total")
            if (q, a) != (doc.metadata["question"], doc.text):
                self.stat_update("changed")
            doc.metadata["question"], doc.text = q, a
            yield doc


class RuleFilter(BaseFilter):
    """`curate.Rules.reason` (boilerplate, echoed question, answer token bounds with the base model's tokenizer),
    tokenizing a batch at a time. Removed rows go to the exclusion writer, under their reason."""

    name = "🔻 rule filters (01 §3)"

    def __init__(self, rules: curate.Rules, tokenizer_path: str, exclusion_writer=None, batch_size: int = 256):
        super().__init__(exclusion_writer, batch_size)
        self.rules, self.tokenizer_path, self._tokenizer = rules, tokenizer_path, None

    def filter(self, doc):
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        out = []
        for doc, n in zip(batch, data.token_lengths([d.text for d in batch], self._tokenizer), strict=True):
            doc.metadata["answer_tokens"] = n
            reason = self.rules.reason(doc.metadata["question"], doc.text, n)
            if reason:
                doc.metadata["reason"] = reason
            out.append((False, reason) if reason else True)
        return out


class ScrubPii(PipelineStep):
    """`pii.PiiScrubber` (Presidio's pattern recognizers) on question and answer; spans per type in the stats."""

    type = "✂️ - FORMAT"
    name = "🔒 PII (01 §4)"

    def __init__(self, min_score: float):
        super().__init__()
        self.min_score, self._scrubber = min_score, None

    def run(self, docs, rank: int = 0, world_size: int = 1):
        if self._scrubber is None:
            self._scrubber = PiiScrubber(self.min_score)
        for doc in docs:
            with self.track_time():
                (q, cq), (a, ca) = self._scrubber.scrub(doc.metadata["question"]), self._scrubber.scrub(doc.text)
            found = cq + ca
            for entity, n in found.items():
                self.stat_update(entity, value=n)
            doc.metadata["question"], doc.text, doc.metadata["pii"] = q, a, sum(found.values())
            yield doc


class NearDupText(PipelineStep):
    """The text near-dedup compares (`curate.near_dup_text`: question and answer) for the MinHash signature, and each
    document's priority (1 for an authored row), one byte per document in task order, for `NearDupClusters`."""

    type = "✂️ - FORMAT"
    name = "🔗 question + answer"

    def __init__(self, priority_folder: str):
        super().__init__()
        self.priority_folder = priority_folder

    def run(self, docs, rank: int = 0, world_size: int = 1):
        os.makedirs(self.priority_folder, exist_ok=True)
        with open(os.path.join(self.priority_folder, f"{rank:05d}.bin"), "wb") as fh:
            for doc in docs:
                fh.write(bytes([_priority(doc) - 1]))
                doc.text = curate.near_dup_text(doc.metadata["question"], doc.text)
                yield doc


class NearDupClusters(MinhashDedupCluster):
    """datatrove's MinHash stage 3 (union-find over the duplicate pairs of every bucket), keeping in each cluster the
    row `curate.dedup` keeps: an authored row first, then the first in task order. datatrove's own block keeps the
    root of its union-find, which may be a forum copy of an authored answer."""

    def __init__(self, input_folder: str, output_folder: str, priority_folder: str, config: MinhashConfig):
        super().__init__(input_folder, output_folder, config=config)
        self.priority_folder = priority_folder

    def run(self, data_=None, rank: int = 0, world_size: int = 1):
        import struct

        from datatrove.utils.binaryio import read_tuples_from_file

        assert world_size == 1, "clustering runs as one task"
        parent: dict[tuple[int, int], tuple[int, int]] = {}

        def find(x):
            parent.setdefault(x, x)
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        with self.track_time():
            for dup_file in self.input_folder.list_files(glob_pattern="*.dups"):
                with self.input_folder.open(dup_file, "rb") as fh:
                    for f1, d1, f2, d2 in read_tuples_from_file(fh, "4I", lines_to_buffer=self.lines_to_buffer):
                        a, b = find((f1, d1)), find((f2, d2))
                        if a != b:
                            parent[max(a, b)] = min(a, b)
            clusters: dict[tuple[int, int], list[tuple[int, int]]] = {}
            for node in parent:
                clusters.setdefault(find(node), []).append(node)
            priorities = {}
            for f in {f for f, _ in parent}:
                with open(os.path.join(self.priority_folder, f"{f:05d}.bin"), "rb") as fh:
                    priorities[f] = fh.read()
            remove: dict[int, list[int]] = {}
            for members in clusters.values():
                keep = min(members, key=lambda m: (-priorities[m[0]][m[1]], m))
                for f, d in members:
                    if (f, d) != keep:
                        remove.setdefault(f, []).append(d)
                self.stat_update("clusters")
                self.stat_update("cluster_size", value=len(members), unit="cluster")
            for f, docs in sorted(remove.items()):
                with self.output_folder.open(f"{f:06d}.remove", "wb") as fh:
                    fh.write(b"".join(struct.pack("<I", d) for d in sorted(docs)))
                self.stat_update("to_remove", value=len(docs))


class _Words(WordTokenizer):
    """`data.words`, so the signature step needs no language model."""

    def word_tokenize(self, text: str) -> list[str]:
        return data.words(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return [text]

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [(0, len(text))]


class NearDupSignature(MinhashDedupSignature):
    """datatrove's MinHash signature over `curate.shingles` (the word 3-grams the in-memory path compares)."""

    def __init__(self, output_folder: str, config: MinhashConfig):
        super().__init__(output_folder, config, language=_Words())

    def get_shingles(self, text: str) -> np.ndarray:
        return np.fromiter((self._hash_func(s) for s in curate.shingles(text)), dtype=np.uint64).reshape((-1, 1))


def _exact_content(doc: Document) -> str:
    return curate.exact_key(doc.metadata["question"], doc.text)


def _question_content(doc: Document) -> str:
    return curate.question_key(doc.metadata["question"], doc.text)


def _priority(doc: Document) -> int:
    """Authored rows win a duplicate cluster, as in `curate.dedup`; then the first in the task's order."""
    return 2 if doc.metadata.get("source") == curate.AUTHORED else 1


_CONTENT = {"exact_duplicate": _exact_content, "same_question": _question_content}
assert _CONTENT.keys() == curate.DEDUP_KEYS.keys()


# ---------------------------------------------------------------- executors

@contextlib.contextmanager
def _console_to(path: str):
    """datatrove's console logging (loguru on stderr) into `path` while the block runs; each task keeps its own full
    log in `logs/<stage>/logs/task_NNNNN.log` either way."""
    with open(path, "a", encoding="utf-8") as fh, contextlib.redirect_stderr(fh):
        logger.remove()
        logger.add(sys.stderr, level="INFO")
        try:
            yield
        finally:
            logger.remove()
    logger.add(sys.stderr, level="WARNING")


class QuietLocalExecutor(LocalPipelineExecutor):
    """LocalPipelineExecutor whose tasks log to their own files only, not to the notebook's or terminal's stderr."""

    def _run_for_rank(self, rank: int, local_rank: int = 0, node_rank: int = -1):
        with _console_to(os.devnull):
            return super()._run_for_rank(rank, local_rank, node_rank)


def _ray_init(ex) -> bool:
    """Connect to `ex.ray_address`, or start a local Ray of `ex.workers` CPUs; False if Ray was already up."""
    import ray

    if ray.is_initialized():
        return False
    try:
        if ex.ray_address:
            ray.init(address=ex.ray_address, log_to_driver=False)
        else:
            ray.init(num_cpus=ex.workers * ex.cpus_per_task, include_dashboard=False, log_to_driver=False)
    except Exception as e:  # ConnectionError and friends: one sentence, not Ray's traceback
        ray.shutdown()  # a local start that timed out leaves Ray's own servers running otherwise
        where = f"at {ex.ray_address}" if ex.ray_address else "locally"
        raise ExecutorUnavailable(f"cannot start the Ray executor {where}: {str(e).splitlines()[0]}") from None
    return True


def check_executor(ex) -> bool:
    """Fail at once, in one sentence, when `ex` cannot run here. True when this call started Ray (or connected to a
    cluster), which `executor_ready` then stops."""
    if ex.kind == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ExecutorUnavailable("data.executor.kind is ray but Ray is not installed (pip install ray)") from None
        return _ray_init(ex)
    if ex.kind == "slurm" and not shutil.which("sbatch"):
        raise ExecutorUnavailable("data.executor.kind is slurm but there is no Slurm here (sbatch is not on PATH)")
    return False


@contextlib.contextmanager
def executor_ready(ex):
    """`check_executor`; on the way out, stop what it started (a local Ray's servers, or the driver's connection to a
    cluster). A Ray that was already up is left as it was."""
    started = check_executor(ex)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()


def make_executor(pipeline: list, ex, *, tasks: int, logging_dir: Path, name: str, depends=None):
    """The datatrove executor for one stage, from the params' `data.executor`."""
    if ex.kind == "local":
        return QuietLocalExecutor(pipeline, tasks=tasks, workers=min(ex.workers, tasks), logging_dir=str(logging_dir))
    if ex.kind == "ray":
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(pipeline, tasks=tasks, workers=min(ex.workers, tasks), logging_dir=str(logging_dir),
                                   cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=ex.mem_per_cpu_gb)
    from datatrove.executor.slurm import SlurmPipelineExecutor

    return SlurmPipelineExecutor(pipeline, tasks=tasks, time=ex.slurm_time, partition=ex.slurm_partition,
                                 cpus_per_task=ex.cpus_per_task, mem_per_cpu_gb=int(max(1, ex.mem_per_cpu_gb)),
                                 job_name=f"aletheia-{name}", logging_dir=str(logging_dir), depends=depends,
                                 venv_path=os.path.join(os.environ["VIRTUAL_ENV"], "bin", "activate")
                                 if os.environ.get("VIRTUAL_ENV") else None)


# ---------------------------------------------------------------- the pipeline

def stages(files_glob: str, out: Path, *, rules: curate.Rules, tokenizer_path: str, pii_min_score: float,
           near_threshold: float, seed: int, tasks: int, fail: bool) -> list[tuple[str, list, int]]:
    """(name, pipeline, tasks) for every stage, in order. Each dedup filter is re-applied by the later stages that
    read `work/clean`, so a document's index in its task (what datatrove's dedup files name) is the same in the
    stage that signs it and the stage that filters it."""
    folder, pattern = os.path.split(os.path.abspath(os.path.expanduser(files_glob)))
    work, removed = out / "work", out / "removed"
    bands, rows_per_band = curate.lsh_bands(near_threshold)
    minhash = MinhashConfig(n_grams=3, num_buckets=bands, hashes_per_bucket=rows_per_band, seed=seed,
                            hash_config=HASHES)
    exact = {k: ExactDedupConfig(content_getter=_CONTENT[k], document_priority=_priority, hash_config=HASHES)
             for k in curate.DEDUP_KEYS}

    def exact_filters(upto: int, write_last: bool = False) -> list:
        keys = list(curate.DEDUP_KEYS)[:upto]
        return [ExactDedupFilter(str(work / k / "dups"), exact[k],
                                 exclusion_writer=RowWriter(removed, k) if write_last and i == len(keys) - 1 else None)
                for i, k in enumerate(keys)]

    out_stages = [("clean", [
        RawReader(folder, pattern, RejectedWriter(out / "rejected"), fail=fail),
        Normalize(),
        RuleFilter(rules, tokenizer_path, exclusion_writer=RowWriter(removed, None, "${reason}/${rank}.jsonl")),
        ScrubPii(pii_min_score),
        RowWriter(work / "clean"),
    ], tasks)]
    for i, key in enumerate(curate.DEDUP_KEYS):
        out_stages += [
            (f"{key}_signatures", [row_reader(work / "clean"), *exact_filters(i, write_last=True),
                                   ExactDedupSignature(str(work / key / "sigs"), exact[key])], tasks),
            (f"{key}_find", [ExactFindDedups(str(work / key / "sigs"), str(work / key / "dups"), exact[key])], 1),
        ]
    n = len(curate.DEDUP_KEYS)
    out_stages += [
        ("near_signatures", [row_reader(work / "clean"), *exact_filters(n, write_last=True),
                             NearDupText(str(work / "minhash" / "priority")),
                             NearDupSignature(str(work / "minhash" / "sigs"), minhash)], tasks),
        ("near_buckets", [MinhashDedupBuckets(str(work / "minhash" / "sigs"), str(work / "minhash" / "buckets"),
                                              config=minhash)], bands),
        ("near_clusters", [NearDupClusters(str(work / "minhash" / "buckets"), str(work / "minhash" / "remove"),
                                           str(work / "minhash" / "priority"), config=minhash)], 1),
        ("write", [row_reader(work / "clean"), *exact_filters(n),
                   MinhashDedupFilter(str(work / "minhash" / "remove"),
                                      exclusion_writer=RowWriter(removed, "near_duplicate")),
                   RowWriter(out / "kept")], tasks),
    ]
    return out_stages


def _lines(folder: Path) -> int:
    return sum(sum(1 for _ in open(f, "rb")) for f in sorted(folder.glob("*.jsonl"))) if folder.is_dir() else 0


def counts(out: Path) -> dict:
    """The funnel of a finished run, from its files: rows in, removed per reason, rows out, PII spans by type."""
    removed = {r: _lines(out / "removed" / r) for r in REASONS[1:]}
    rows_out = _lines(out / "kept")
    invalid = _lines(out / "rejected")
    pii = Counter()
    stats = out / "logs" / "clean" / "stats.json"
    if stats.is_file():
        for step in json.loads(stats.read_text()):
            if "🔒" in step.get("name", ""):
                pii.update({k: int(v["total"]) for k, v in step["stats"].items()
                            if k.isupper() and isinstance(v, dict)})
    return {"rows_in": invalid + sum(removed.values()) + rows_out, "invalid rows": invalid, **removed,
            "rows_out": rows_out, "pii_spans": dict(pii)}


def kept_rows(out: Path) -> list[dict]:
    """The curated rows of a finished run (small outputs: the notebook's comparison, tests)."""
    return [json.loads(line) for f in sorted((out / "kept").glob("*.jsonl")) for line in open(f, encoding="utf-8")]


def removed_rows(out: Path) -> list[dict]:
    return [json.loads(line) for f in sorted((out / "removed").glob("*/*.jsonl")) for line in open(f, encoding="utf-8")]


def _clear(out: Path) -> None:
    for name in ("kept", "removed", "rejected", "work", "logs", "summary.json", "settings.json"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _run_stage(name: str, pipeline: list, tasks: int, ex, out: Path, on_invalid: str) -> float:
    """One stage to its end; its seconds. Incomplete tasks raise `StageFailed`; invalid lines under
    `on_invalid="fail"` raise `data.InvalidData` after removing what the run wrote."""
    t0 = time.perf_counter()
    executor_ = make_executor(pipeline, ex, tasks=tasks, logging_dir=out / "logs" / name, name=name)
    try:
        (out / "logs" / name).mkdir(parents=True, exist_ok=True)
        with _console_to(str(out / "logs" / name / "console.log")):
            executor_.run()
        failed = executor_.get_incomplete_ranks(skip_completed=True)
    except Exception as e:
        failed, error = [-1], e
    else:
        error = None
    if failed:
        if name == "clean" and on_invalid == "fail" and _lines(out / "rejected"):
            problems = [data.Problem(r["file"], r["line"], *reason.split(": ", 1))
                        for f in sorted((out / "rejected").glob("*.jsonl"))
                        for r in map(json.loads, open(f, encoding="utf-8")) for reason in r["reasons"]]
            _clear(out)
            raise data.InvalidData(problems)
        raise StageFailed(f"stage {name} did not complete ({error or f'tasks {failed} failed'}); "
                          f"its logs are in {out / 'logs' / name}") from error
    return round(time.perf_counter() - t0, 2)


def run(files_glob: str, out: str | Path, *, rules: curate.Rules, tokenizer_path: str, pii_min_score: float = 0.3,
        near_threshold: float = 0.6, seed: int = 0, executor=None, on_invalid: str = "skip",
        fresh: bool = False) -> dict:
    """Run every stage with `executor` (a `config.Executor`; local with 2 tasks when None) into `out`; return the
    funnel (also written to `out/summary.json`). Tasks already completed by an earlier run with the same folder are
    skipped (datatrove's completion markers), so a rerun after a kill continues; `fresh=True` starts over.

    `on_invalid="fail"`: any invalid line stops the run with `data.InvalidData` (`FILE:LINE: field: reason` for
    every one) and removes what it wrote."""
    ex = executor or config.Executor()
    out = Path(out)
    settings = json.dumps({"input": os.path.abspath(files_glob), "rules": repr(rules), "tokenizer": tokenizer_path,
                           "pii_min_score": pii_min_score, "near_threshold": near_threshold, "seed": seed,
                           "tasks": ex.tasks, "on_invalid": on_invalid}, sort_keys=True)
    marker = out / "settings.json"
    if fresh or (marker.is_file() and marker.read_text(encoding="utf-8") != settings):
        _clear(out)  # resuming is only for the same input and settings
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(settings, encoding="utf-8")
    with executor_ready(ex):
        plan = stages(files_glob, out, rules=rules, tokenizer_path=tokenizer_path, pii_min_score=pii_min_score,
                      near_threshold=near_threshold, seed=seed, tasks=ex.tasks, fail=on_invalid == "fail")
        if ex.kind == "slurm":  # one sbatch job per stage, each depending on the one before; returns once submitted
            executors = []
            for name, pipeline, tasks in plan:
                executors.append(make_executor(pipeline, ex, tasks=tasks, logging_dir=out / "logs" / name,
                                               name=name, depends=executors[-1] if executors else None))
            executors[-1].run()
            return {"submitted": [e.job_name for e in executors], "logs": str(out / "logs")}
        start = time.perf_counter()
        seconds = {name: _run_stage(name, pipeline, tasks, ex, out, on_invalid) for name, pipeline, tasks in plan}
    summary = counts(out) | {"seconds": seconds, "total_seconds": round(time.perf_counter() - start, 2),
                             "executor": ex.model_dump(), "near_bands": list(curate.lsh_bands(near_threshold))}
    files.write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def run_params(cfg, files_glob: str, out: str | Path, **kw) -> dict:
    """`run` with every setting from a loaded params file (`data.*`, `run.base_model`, `run.seed`)."""
    d = cfg.data
    return run(files_glob, out, rules=curate.Rules.from_config(d),
               tokenizer_path=str(models.resolve(cfg.run.base_model)), pii_min_score=d.pii_min_score,
               near_threshold=d.near_dup_threshold, seed=cfg.run.seed, executor=d.executor,
               on_invalid=d.on_invalid, **kw)


# ---------------------------------------------------------------- a large corpus with planted duplicates

def synthetic_corpus(path: str | Path, n_rows: int, *, seed: int = 0, bad_every: int = 50_000) -> dict:
    """Write `n_rows` raw rows made from the shipped corpus, for the scale test and benchmark, and return what was
    planted. Each base row takes a corpus row, gives its question a unique suffix and swaps half of its answer's
    words for random corpus words (so base rows are not near duplicates of one another). In every 20 rows, one is an
    exact copy of a base row (another id) and one a near copy (one word changed in question and answer). Every
    `bad_every`-th line is a malformed line. Returns {"exact": [(base id, copy id)], "near": [...], "bad": n}."""
    import random

    rng = random.Random(seed)
    corpus = [json.loads(line) for f in sorted((config.PROJECT / "data" / "raw").glob("*.jsonl"))
              for line in open(f, encoding="utf-8")]
    vocab = sorted({w for r in corpus for w in r["answer"].split()})
    planted: dict = {"exact": [], "near": [], "bad": 0}
    bases: list[dict] = []
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n_rows):
            k = i % 20
            if k == 18 and bases:
                base = bases[-rng.randrange(1, min(len(bases), 17) + 1)]
                row = {**base, "id": f"x{i}"}
                planted["exact"].append((base["id"], row["id"]))
            elif k == 19 and bases:
                base = bases[-rng.randrange(1, min(len(bases), 17) + 1)]
                words = base["answer"].split(" ")
                j = rng.randrange(len(words))
                words[j] = rng.choice(vocab)
                row = {**base, "id": f"n{i}", "question": base["question"] + " Again?", "answer": " ".join(words)}
                planted["near"].append((base["id"], row["id"]))
            else:
                src = corpus[rng.randrange(len(corpus))]
                words = [w if rng.random() < 0.5 else rng.choice(vocab) for w in src["answer"].split(" ")]
                row = {**src, "id": f"s{i}", "question": f"{src['question']} (case {i})", "answer": " ".join(words)}
                if src["source"] == curate.AUTHORED:
                    bases.append(row)
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            if bad_every and i % bad_every == bad_every // 2:
                fh.write('{"id": "broken", "question": \n')
                planted["bad"] += 1
    return planted


def planted_found(out: Path, planted: dict) -> dict:
    """Recall and precision of the planted duplicates in a finished run: a planted pair is found when one of its two
    rows was removed for that reason and the other kept (a pair whose base a rule filter removed does not count)."""
    kept = {json.loads(line)["id"] for f in (out / "kept").glob("*.jsonl") for line in open(f, encoding="utf-8")}
    result = {}
    for kind, reason in (("exact", "exact_duplicate"), ("near", "near_duplicate")):
        removed = {json.loads(line)["id"] for f in (out / "removed" / reason).glob("*.jsonl")
                   for line in open(f, encoding="utf-8")}
        pairs = [(a, b) for a, b in planted[kind] if a in kept or b in kept]
        found = sum(1 for a, b in pairs if (a in removed) != (b in removed))
        in_pairs = {x for pair in pairs for x in pair}
        result[kind] = {"planted": len(pairs), "found": found, "removed": len(removed),
                        "recall": round(found / len(pairs), 4) if pairs else None,
                        "precision": round(len(removed & in_pairs) / len(removed), 4) if removed else None}
    return result
