"""GGUF export and the quantization ladder, each level measured (06_gguf).

Conversion is llama.cpp's own `convert_hf_to_gguf.py`, quantization its `llama-quantize`, optionally weighted by an
importance matrix that its `llama-imatrix` computes over the training text; all from the same llama.cpp version.
Each level is measured against the merged HF model on the same token ids: perplexity of held-out responses and
greedy-token agreement. `served_f16` serves an HF folder as an F16 GGUF, the way 03's policy, 08's compared models
and the recipe sweep answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data, files, llamacpp
from .config import QUANT_TYPES
from .pipeline import write_json
from .serve import Server, ServerError, check_gguf, llama_server


class GGUFError(RuntimeError):
    """A conversion, quantization or check failed."""


def gguf_path(stage_dir: Path, level: str) -> Path:
    """Where 06_gguf writes one level: `model-F16.gguf`, `model-Q4_K_M.gguf`, `model-Q4_K_M-imatrix.gguf` …"""
    return Path(stage_dir) / f"model-{level}.gguf"


def _check_model_dir(model_dir: Path) -> None:
    if not (model_dir / "config.json").is_file():
        raise GGUFError(f"{model_dir}: not a model folder (config.json missing)")
    if not any(model_dir.glob("*.safetensors")):
        raise GGUFError(f"{model_dir}: no *.safetensors weights")


def _write_failed(what: str, out: Path, detail: str) -> GGUFError:
    """One error naming the file that was not written, why, and the free space left on its disk."""
    free = shutil.disk_usage(out.parent).free
    full = any(s in detail.lower() for s in ("no space left", "not enough free space")) or free < 16 << 20
    reason = f"the disk is full ({free >> 20} MiB free in {out.parent})" if full else \
        f"{free >> 20} MiB free in {out.parent}"
    return GGUFError(f"{what} failed: {out} was not written ({reason}); no partial file is left, and the stage "
                     f"redoes it on the next run.\n{detail}".rstrip())


def _check_complete(tmp: Path, out: Path) -> None:
    """The written file parses and holds every tensor it declares, or `GGUFError` naming `out`."""
    try:
        read_metadata(tmp)
    except GGUFError as e:
        raise GGUFError(str(e).replace(str(tmp), str(out))) from None


def convert(model_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f16") -> Path:
    """HF folder → GGUF with llama.cpp's converter; written to a temporary name, checked complete and renamed
    (`files.atomic_write`); a failure (a full disk too) names `out` and leaves nothing there."""
    model_dir, out = Path(model_dir), Path(out)
    _check_model_dir(model_dir)
    with files.atomic_write(out) as tmp:
        proc = subprocess.run([sys.executable, str(llamacpp.converter()), str(model_dir), "--outfile", str(tmp),
                               "--outtype", outtype], env=llamacpp.converter_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.splitlines()[-8:])
            raise _write_failed(f"convert_hf_to_gguf.py on {model_dir} (exit {proc.returncode})", out, tail)
        _check_complete(tmp, out)
    return out


@contextlib.contextmanager
def served_f16(model_dir: str | os.PathLike, *, name: str = "model", workdir: str | os.PathLike | None = None,
               **server_options) -> Iterator[Server]:
    """The HF folder `model_dir` converted (`convert`) to `{name}-F16.gguf` in a temporary folder under `workdir`
    (default: the system's) and served by `serve.llama_server(gguf, **server_options)`; on exit the server stops and
    the GGUF is removed."""
    with tempfile.TemporaryDirectory(prefix=".f16-", dir=workdir) as tmp:
        with llama_server(convert(model_dir, Path(tmp) / f"{name}-F16.gguf"), **server_options) as server:
            yield server


def _run_tool(name: str, args: list[str], what: str, out: Path, tmp: Path) -> None:
    """Run one of llama.cpp's tools writing `tmp`; a failure raises `_write_failed` with its error lines."""
    proc = subprocess.run([str(llamacpp.tool(name)), *args], capture_output=True, text=True)
    if proc.returncode != 0 or not tmp.is_file():
        log = (proc.stdout + proc.stderr).splitlines()
        errors = [line for line in log if "fail" in line or "error" in line.lower() or "need at least" in line]
        raise _write_failed(f"{what} (exit {proc.returncode})", out, "\n".join((errors or log)[-4:]))


def calibration_text(rows: list[dict], style: str, tokenizer) -> str:
    """SFT rows as the model was trained on them (prompt format, answer, end-of-turn), one after another: the text
    `importance_matrix` runs the model over."""
    return "".join(data.format_example(r["prompt"], r["response"], style, tokenizer) for r in rows)


def importance_matrix(src: str | os.PathLike, text_file: str | os.PathLike, out: str | os.PathLike, *,
                      context: int = 512, chunks: int | None = None, threads: int | None = None) -> Path:
    """llama.cpp's `llama-imatrix`: run the model in `src` over `text_file` in chunks of `context` tokens (the first
    `chunks` of them, all if None; special tokens parsed, as in training) and record, for every weight matrix, the
    mean square of each of its input columns; `quantize(..., imatrix=out)` then weights each weight's rounding error
    by it. The text needs at least 2 × `context` tokens. Written like `convert`."""
    src, out = read_metadata(src)["path"], Path(out)
    with files.atomic_write(out) as tmp:
        _run_tool("llama-imatrix", ["-m", str(src), "-f", str(text_file), "-o", str(tmp), "--output-format", "gguf",
                                    "-c", str(context), "--chunks", str(chunks or -1), "--parse-special", "--no-ppl",
                                    "-t", str(threads or os.cpu_count() or 1)],
                  f"llama-imatrix on {src} over {text_file}", out, tmp)
    return out


def imatrix_info(path: str | os.PathLike) -> dict:
    """What an importance matrix was computed from, as `llama-imatrix` recorded it: the calibration files
    (`datasets`), the `chunks` and the tokens per chunk (`chunk_size`)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    return {"datasets": fields["imatrix.datasets"].contents(), "chunks": fields["imatrix.chunk_count"].contents(),
            "chunk_size": fields["imatrix.chunk_size"].contents()}


def quantize(src: str | os.PathLike, out: str | os.PathLike, level: str, threads: int | None = None,
             imatrix: str | os.PathLike | None = None) -> Path:
    """Quantize `src` to `level` (e.g. Q4_K_M) with llama.cpp's `llama-quantize`, each weight's rounding error
    weighted by the importance matrix `imatrix` when given (`importance_matrix`); written like `convert`."""
    if level.upper() not in QUANT_TYPES:
        raise GGUFError(f"unknown quant type {level!r} (known: {', '.join(QUANT_TYPES)})")
    src, out = read_metadata(src)["path"], Path(out)
    weighting = ["--imatrix", str(imatrix)] if imatrix else []
    threads = str(threads or os.cpu_count() or 1)
    with files.atomic_write(out) as tmp:
        _run_tool("llama-quantize", [*weighting, str(src), str(tmp), level.upper(), threads],
                  f"llama-quantize {src} → {level}{' with ' + str(imatrix) if imatrix else ''}", out, tmp)
        _check_complete(tmp, out)
    return out


_METADATA: dict[tuple, dict] = {}  # read_metadata's results by file identity: GGUFReader takes seconds per file


def read_metadata(path: str | os.PathLike) -> dict:
    """Chat template, EOS id, tensor count, parameters, bits per weight and the importance matrix it was quantized
    with (`imatrix`, None for none); a truncated file is an error. Read once per file (device, inode, size and
    modification time: a file renamed into place is still known, one rewritten is read again)."""
    try:
        path = check_gguf(path)
    except ServerError as e:
        raise GGUFError(str(e)) from None
    st = path.stat()
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _METADATA:
        _METADATA[key] = _parse_metadata(path, st.st_size)
    return {"path": path, **_METADATA[key]}


def _parse_metadata(path: Path, size: int) -> dict:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:
        raise GGUFError(f"{path}: unreadable GGUF ({e}); the file may be truncated") from None
    end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    if end > size:
        raise GGUFError(f"{path}: truncated ({size} bytes, tensors need {end})")

    def field(name):
        f = reader.fields.get(name)
        return f.contents() if f is not None else None

    n_params = sum(int(t.n_elements) for t in reader.tensors)
    return {"size_bytes": size, "n_tensors": len(reader.tensors), "n_params": n_params,
            "bpw": sum(int(t.n_bytes) for t in reader.tensors) * 8 / n_params,
            "chat_template": field("tokenizer.chat_template"), "eos_token_id": field("tokenizer.ggml.eos_token_id"),
            "architecture": field("general.architecture"), "imatrix": field("quantize.imatrix.file")}


# ---------------------------------------------------------------- measuring a level against the HF model

@dataclass
class Probe:
    """Token ids shared by every model under test: prompt + reference response, and prompt + HF greedy answer."""

    prompt: list[int]
    response: list[int]
    greedy: list[int]


def probes(model, tokenizer, rows: list[dict], style: str, greedy_tokens: int, batch_size: int = 8) -> list[Probe]:
    """Tokenize held-out (prompt, response) rows once; the HF model's greedy answer is the agreement target."""
    prompts, responses = [], []
    for row in rows:
        prompt = tokenizer(data.format_prompt(row["prompt"], style, tokenizer), add_special_tokens=False).input_ids
        full = tokenizer(data.format_example(row["prompt"], row["response"], style, tokenizer),
                         add_special_tokens=False).input_ids
        if full[:len(prompt)] != prompt:
            raise GGUFError("the prompt's tokens are not a prefix of prompt+response; cannot score responses")
        prompts.append(prompt)
        responses.append(full[len(prompt):])
    greedy = [g for i in range(0, len(prompts), batch_size)
              for g in _greedy(model, tokenizer, prompts[i:i + batch_size], greedy_tokens)]
    return [Probe(*t) for t in zip(prompts, responses, greedy, strict=True)]


def _greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations of a left-padded batch, each cut after its first EOS."""
    import torch

    width = max(map(len, prompts))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad)[:, width:].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    return [seq[:next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))] for seq in out]


def _score(logits: np.ndarray, n_prompt: int, continuation: list[int]) -> tuple[float, np.ndarray]:
    """Summed NLL of `continuation` (log-sum-exp of each row minus its target's logit, in float64) and the argmax
    prediction at each of its positions."""
    import torch

    rows = torch.from_numpy(logits[n_prompt - 1:n_prompt - 1 + len(continuation)]).double()
    picked = rows[torch.arange(len(continuation)), torch.tensor(continuation)]
    return float((rows.logsumexp(-1) - picked).sum()), rows.argmax(-1).numpy()


def measure_hf(model, batch: list[Probe]) -> dict:
    """Perplexity of the HF model itself on the same tokens: the reference line of the ladder."""
    import torch

    nll, n = 0.0, 0
    for p in batch:
        with torch.inference_mode():
            logits = model(torch.tensor([p.prompt + p.response])).logits[0].float().numpy()
        nll, n = nll + _score(logits, len(p.prompt), p.response)[0], n + len(p.response)
    return {"perplexity": float(np.exp(nll / n)), "scored_tokens": n}


def measure_gguf(path: str | os.PathLike, batch: list[Probe], n_ctx: int = 2048, threads: int | None = None) -> dict:
    """Perplexity on held-out responses and teacher-forced greedy agreement with the HF model, run by llama.cpp.
    Each prompt is evaluated once: its KV cache is kept and only the continuation after it is re-evaluated."""
    from llama_cpp import Llama

    path = read_metadata(path)["path"]
    longest = max(len(p.prompt) + max(len(p.response), len(p.greedy)) for p in batch)
    llm = Llama(model_path=str(path), n_ctx=max(n_ctx, longest), logits_all=True, verbose=False,
                n_threads=threads or os.cpu_count(), n_batch=512)
    nll, n, hits, total = 0.0, 0, 0, 0
    try:
        for p in batch:
            llm.reset()
            llm.eval(p.prompt)
            for cont, is_greedy in ((p.response, False), (p.greedy, True)):
                llm.n_tokens = len(p.prompt)  # eval() drops the KV cache after n_tokens: the prompt's stays
                llm.eval(cont)
                s, pred = _score(np.asarray(llm.scores[:llm.n_tokens]), len(p.prompt), cont)
                if is_greedy:
                    hits, total = hits + int((pred == np.array(cont)).sum()), total + len(cont)
                else:
                    nll, n = nll + s, n + len(cont)
    finally:
        llm.close()
    return {"perplexity": float(np.exp(nll / n)), "scored_tokens": n, "greedy_agreement": hits / total}


def check_metadata(meta: dict, tokenizer) -> dict:
    """The GGUF carries the tokenizer's chat template and EOS id, or the served model never stops right."""
    eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token)
    template_ok, eos_ok = meta["chat_template"] == tokenizer.chat_template, meta["eos_token_id"] == eos
    problems = [] if template_ok else ["chat template differs from the tokenizer's"]
    if not eos_ok:
        problems.append(f"EOS id {meta['eos_token_id']} != tokenizer's {eos} ({tokenizer.eos_token})")
    return {"chat_template_ok": template_ok, "eos_token_id": meta["eos_token_id"], "eos_ok": eos_ok,
            "problems": problems}


def write_table(rows: list[dict], out: Path) -> Path:
    """The ladder as JSON rows (paths as strings), written atomically."""
    return write_json(out, json.loads(json.dumps(rows, default=str)))
