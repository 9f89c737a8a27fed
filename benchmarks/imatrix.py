"""The importance matrix on validation: plain and imatrix quants of a finished run's merged model, their perplexity
against the 16-bit file on the validation split (`01_curate/sft_val.jsonl`, never the eval split 06 reports on).

    .venv/bin/python benchmarks/imatrix.py [--run-dir runs/default-check] [--settings 256:128,512:64]

The first `--settings` entry (tokens per chunk : chunks, `all` for the whole training split) quantizes every level of
`--levels` both ways; each further entry computes another matrix and quantizes `Q4_K_M` with it. Every file is
measured like 06 (`au.gguf.measure_gguf`: perplexity of the reference answers, greedy agreement on the same token
ids). Writes benchmarks/results/imatrix.{json,png}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import common

import aletheia_utils as au


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=None, help="finished run whose 04_merge model and 01_curate data are used")
    parser.add_argument("--levels", default="Q4_K_M,Q5_K_M")
    parser.add_argument("--settings", default="256:128,512:64", help="context:chunks of each matrix")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = common.source_run(args.run_dir)
    machine = common.machine()
    merged = source / "04_merge" / "model"
    tokenizer = AutoTokenizer.from_pretrained(merged)
    cfg = au.config.load(common.ROOT / "params" / "default.yaml")
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    val = au.data.load_split(source / "01_curate" / "sft_val.jsonl", "sft")
    probes = au.gguf.probes(model, tokenizer, val, cfg.data.prompt_format, cfg.gguf.agreement_tokens)
    hf = au.gguf.measure_hf(model, probes)
    del model
    rows = []
    with tempfile.TemporaryDirectory(prefix="imatrix-") as tmp:
        tmp = Path(tmp)
        f16 = au.gguf.convert(merged, tmp / "model-F16.gguf")
        train = au.data.load_split(source / "01_curate" / "sft.jsonl", "sft")
        text = au.files.write_text(tmp / "calibration.txt",
                                   au.gguf.calibration_text(train, cfg.data.prompt_format, tokenizer))

        def measure(level: str, path: Path, **extra) -> None:
            scores = au.gguf.measure_gguf(path, probes, threads=args.threads)
            meta = au.gguf.read_metadata(path)
            rows.append({"level": level, "size_bytes": meta["size_bytes"], "bpw": meta["bpw"], **scores, **extra})
            print(level, extra, f"perplexity {scores['perplexity']:.3f}", flush=True)

        measure("F16", f16)
        for i, setting in enumerate(args.settings.split(",")):
            context, chunks = (int(x) if x != "all" else None for x in setting.split(":"))
            with common.Timer() as made:
                imatrix = au.gguf.importance_matrix(f16, text, tmp / f"imatrix-{setting}.gguf", context=context,
                                                    chunks=chunks, threads=args.threads)
            info = {"imatrix": setting, "imatrix_s": made.s, **au.gguf.imatrix_info(imatrix)}
            for level in args.levels.split(",") if i == 0 else ["Q4_K_M"]:
                if i == 0:
                    measure(level, au.gguf.quantize(f16, tmp / f"{level}.gguf", level, args.threads))
                out = tmp / f"{level}-imatrix-{i}.gguf"
                measure(level + au.config.IMATRIX, au.gguf.quantize(f16, out, level, args.threads, imatrix=imatrix),
                        **{k: v for k, v in info.items() if k != "datasets"})
    for r in rows:
        r["size_vs_16bit"] = r["size_bytes"] / rows[0]["size_bytes"]
        r["perplexity_vs_16bit"] = r["perplexity"] / rows[0]["perplexity"] - 1
    common.write("imatrix", {"machine": machine, "source_run": common.relative(source), "split": "sft_val",
                             "texts": len(probes), "scored_tokens": hf["scored_tokens"],
                             "hf_perplexity": hf["perplexity"], "rows": rows},
                 {f"{r['level']} {r.get('imatrix', '')}".strip(): 100 * r["perplexity_vs_16bit"] for r in rows[1:]},
                 "perplexity vs the 16-bit file, % (validation split)")


if __name__ == "__main__":
    main()
