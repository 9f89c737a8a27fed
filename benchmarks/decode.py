"""Single-stream decode tokens/s, side by side in one run: llama.cpp (`llama_cpp.Llama`) on a GGUF versus
`transformers` `generate` on the merged HF model, greedy, on the same held-out prompts.

    .venv/bin/python benchmarks/decode.py [--run-dir runs/default-check] [--prompts 4] [--max-tokens 128]

The GGUF is the run's 06_gguf/model-<serve_quant>.gguf when it exists, else the embedded model's own GGUF (same
architecture and size as the merged model). Writes benchmarks/results/decode.{json,png}.
"""

from __future__ import annotations

import argparse
import os

import common
import torch

import aletheia_utils as au


def llama_cpp(gguf: str, prompts: list[str], max_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=gguf, n_ctx=2048, n_threads=threads, seed=0, verbose=False)
    try:
        llm.create_chat_completion([{"role": "user", "content": "warm up"}], max_tokens=8, temperature=0.0)
        tokens = 0
        with common.Timer() as t:
            for p in prompts:
                out = llm.create_chat_completion([{"role": "user", "content": p}], max_tokens=max_tokens,
                                                 temperature=0.0)
                tokens += out["usage"]["completion_tokens"]
    finally:
        llm.close()
    return {"tokens": tokens, "seconds": t.s, "tokens_per_s": tokens / t.s}


def hf_generate(model_dir: str, prompts: list[str], max_tokens: int, dtype) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    encoded = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True) for p in prompts]
    with torch.no_grad():
        model.generate(**encoded[0], max_new_tokens=8, do_sample=False)
        tokens = 0
        with common.Timer() as t:
            for ids in encoded:
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
                tokens += out.shape[1] - ids["input_ids"].shape[1]
    return {"tokens": tokens, "seconds": t.s, "tokens_per_s": tokens / t.s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default=None, help="finished run with 04_merge/model (and 06_gguf)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for torch and llama.cpp")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = common.source_run(args.run_dir)
    cfg = au.config.load(common.ROOT / "params" / "default.yaml")
    merged = run / "04_merge" / "model"
    if not (merged / "config.json").is_file():
        raise SystemExit(f"{merged}: no merged model; run the pipeline to 04_merge first")
    prompts = [r["prompt"] for r in au.data.load_split(run / "01_curate" / "eval.jsonl", "sft")[:args.prompts]]
    gguf, gguf_kind = common.pick_gguf(run, cfg)
    machine = common.machine()
    variants = {"transformers generate fp32": hf_generate(str(merged), prompts, args.max_tokens, torch.float32),
                "transformers generate bf16": hf_generate(str(merged), prompts, args.max_tokens, torch.bfloat16),
                f"llama.cpp {gguf_kind.split(' (')[0]}": llama_cpp(str(gguf), prompts, args.max_tokens, args.threads)}
    base = next(iter(variants.values()))["tokens_per_s"]
    for name, v in variants.items():
        v["speedup_vs_transformers_fp32"] = v["tokens_per_s"] / base
        print(name, {k: round(x, 2) for k, x in v.items()}, flush=True)
    common.write("decode", {"machine": machine, "gguf": common.relative(gguf), "gguf_kind": gguf_kind,
                            "merged_model": common.relative(merged),
                            "prompts": len(prompts), "max_tokens": args.max_tokens, "variants": variants},
                 {k: v["tokens_per_s"] for k, v in variants.items()}, "single-stream decode tokens/s")


if __name__ == "__main__":
    main()
