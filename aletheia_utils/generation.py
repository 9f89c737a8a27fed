"""Answers to prompts, each saying how many tokens it took and whether it ended on its own (end-of-turn before the
token limit): transformers `generate` in left-padded batches, plain greedy (02/03's before and after), or an
OpenAI-compatible server (llama-server: its chat endpoint, or its completion endpoint for the `markers` prompt format),
greedy or sampled with a seed, with llama-server's own sampler fields for repetition control (`eval.generation`),
which 08 uses for every compared model.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import openai

from . import data, serve


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # generated tokens, the end-of-turn token excluded
    ended: bool  # stopped on its own (end-of-turn) before the token limit

    def to_dict(self) -> dict:
        return asdict(self)


def _eos_ids(model, tokenizer) -> set[int]:
    eos = model.generation_config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def hf_answers(model, tokenizer, prompts: Sequence[str], style: str, *, max_new_tokens: int,
               batch_size: int = 16) -> list[Answer]:
    """Plain greedy answers in left-padded batches, prompted in the training format."""
    import torch

    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos, out = _eos_ids(model, tokenizer), []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [data.format_prompt(p, style, tokenizer) for p in prompts[i:i + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                ids = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     top_k=None, top_p=None, temperature=None)
            for row in ids[:, batch["input_ids"].shape[1]:].tolist():
                end = next((k for k, t in enumerate(row) if t in eos), None)
                kept = row if end is None else row[:end]
                out.append(Answer(tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept),
                                  end is not None))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def server_answers(server, prompts: Sequence[str], *, max_new_tokens: int, sampling: dict | None = None,
                   temperature: float = 0.0, samples: int = 1, seed: int = 0, concurrency: int = 4,
                   timeout: float = 300, style: str = "chat_template") -> list[list[Answer | None]]:
    """`samples` answers per prompt from an OpenAI-compatible server, as one list per sample (None where a request
    failed), all decoded `concurrency` at a time: greedy at `temperature` 0, else sample j is drawn with seed
    `seed + j`. `style` is the prompt format: `chat_template` asks the chat endpoint (the server applies the model's
    template), `markers` the completion endpoint with the markers prompt text. `sampling`: llama-server's own
    sampler fields (e.g. `repeat_penalty`), sent as they are."""
    api = serve.client(server, timeout=timeout)

    def one(job: tuple[int, str]) -> Answer | None:
        j, prompt = job
        kw = dict(model=server.model, max_tokens=max_new_tokens, temperature=temperature, seed=seed + j,
                  extra_body=sampling or {})
        try:
            if style == "markers":
                r = api.completions.create(prompt=data.format_prompt(prompt, style), **kw)
                text = r.choices[0].text
            else:
                r = api.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kw)
                text = r.choices[0].message.content
        except openai.OpenAIError:
            return None
        return Answer((text or "").strip(), r.usage.completion_tokens if r.usage else 0,
                      r.choices[0].finish_reason == "stop")

    with ThreadPoolExecutor(concurrency) as pool:
        flat = list(pool.map(one, [(j, p) for j in range(samples) for p in prompts]))
    return [flat[j * len(prompts):(j + 1) * len(prompts)] for j in range(samples)]
