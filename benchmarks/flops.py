"""Model FLOPs of LoRA training, counted from the model config (benchmarks/README.md, "How close to the limit").

The accounting is the "model FLOPs" of the PaLM paper (appendix B) and Chinchilla (appendix F): only matrix
multiplications count, 2 FLOPs per multiply-add; norms, activations, softmax, RoPE, dropout, the embedding lookup and
the optimizer are left out. Work an implementation does beyond what the training math needs (padding, logits at
positions that are not scored, recomputation) is not counted, so every variant of a benchmark is credited with the
same FLOPs and its fraction of the machine's peak says how close it gets to the limit. Where this departs from those
papers (they train every weight, we train LoRA adapters on a frozen base), the backward pass is split as below.
"""

from __future__ import annotations

from collections.abc import Iterable


def _shape(config) -> tuple[int, int, int, int, int, int, int]:
    d, h = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or d // h
    kv = getattr(config, "num_key_value_heads", None) or h
    return d, config.num_hidden_layers, h, kv, head_dim, config.intermediate_size, config.vocab_size


def base_matmul_params(config) -> int:
    """Weights of the decoder layers' matmuls (q, k, v, o; gated MLP gate, up, down), LM head and embedding excluded."""
    d, layers, h, kv, head_dim, ff, _ = _shape(config)
    return layers * (2 * d * h * head_dim + 2 * d * kv * head_dim + 3 * d * ff)


def lora_params(config, r: int, target_modules: Iterable[str]) -> int:
    """Weights of rank-`r` LoRA adapters on `target_modules` of every layer: r·(d_in + d_out) per adapted matmul."""
    d, layers, h, kv, head_dim, ff, _ = _shape(config)
    sizes = {"q_proj": (d, h * head_dim), "k_proj": (d, kv * head_dim), "v_proj": (d, kv * head_dim),
             "o_proj": (h * head_dim, d), "gate_proj": (d, ff), "up_proj": (d, ff), "down_proj": (ff, d)}
    return layers * sum(r * sum(sizes[m]) for m in target_modules)


def model_flops_per_token(config, lora_params: int, context: float, head_fraction: float = 1.0,
                          backward: bool = True) -> float:
    """Model FLOPs per token of one LoRA training step (`backward`) or of one forward pass (`backward=False`).

    With N the decoder layers' matmul weights (`base_matmul_params`, frozen), A the LoRA weights (`lora_params`, each
    used once per token), V·d the LM head (frozen; tied or not), L layers of H query heads of size dₕ, c the mean
    number of keys a token attends to (`context`; a causal sequence of s tokens: (s + 1)/2) and f the share of tokens
    whose logits the loss needs (`head_fraction`):

        forward  = 2N + 2A + 2·f·V·d + 4·L·c·H·dₕ           (QKᵀ and the weighted sum of V: 2·c·H·dₕ each)
        backward = 2N + 4A + 2·f·V·d + 8·L·c·H·dₕ

    The backward pass of a frozen weight computes only the gradient of its input (1× its forward); a LoRA weight
    also its own gradient (2× its forward); attention, which has no weights, the gradients of Q, K and V (2×). So a
    training token costs 4N + 6A + 4fVd + 12·L·c·H·dₕ, against the 6N + 12·L·s·H·dₕ of full fine-tuning in PaLM's
    count (which takes the whole sequence s as every token's context; causal attention needs half of it). The first
    layer's input gradient, which autograd skips under a frozen embedding, is counted (under 1% of N's share).
    """
    d, layers, h, _, head_dim, _, vocab = _shape(config)
    n, head, attention = base_matmul_params(config), head_fraction * vocab * d, 2 * layers * context * h * head_dim
    forward = 2 * n + 2 * lora_params + 2 * head + 2 * attention
    return forward + (2 * n + 4 * lora_params + 2 * head + 4 * attention if backward else 0)


def sequence_flops(config, lora_params: int, length: int, scored: int, backward: bool = True) -> float:
    """Model FLOPs of one causal sequence of `length` tokens of which `scored` need their logits."""
    if length <= 0:
        return 0.0
    return length * model_flops_per_token(config, lora_params, (length + 1) / 2, scored / length, backward)


def packed_stats(dataset) -> dict:
    """Of an SFT training dataset as TRL prepared it (packed or not): the tokens, the mean causal context of a token
    (sequences attend within themselves: TRL's `seq_lengths` where it packed, else each row) and the share of tokens
    whose logits the loss needs (labels other than -100, else the completion mask; every token without either)."""
    columns = dataset.column_names
    lengths = [len(ids) for ids in dataset["input_ids"]]
    tokens = sum(lengths)
    sequences = [n for row in dataset["seq_lengths"] for n in row] if "seq_lengths" in columns else lengths
    if "labels" in columns:
        scored = sum(sum(t != -100 for t in row) for row in dataset["labels"])
    elif "completion_mask" in columns:
        scored = sum(sum(row) for row in dataset["completion_mask"])
    else:
        scored = tokens
    return {"tokens": tokens, "context": sum(s * (s + 1) / 2 for s in sequences) / tokens,
            "head_fraction": scored / tokens}


def pair_flops(config, lora_params: int, pairs, max_length: int | None, backward: bool) -> float:
    """Model FLOPs of DPO pairs as TRL tokenized them (`prompt_ids`, `chosen_ids`, `rejected_ids`): the prompt + chosen
    and the prompt + rejected sequences, each cut to `max_length` (from the end, as TRL's default `keep_start`), with
    the logits of the answer tokens only. `backward=False`: the reference model's forward pass."""
    total = 0.0
    for prompt, chosen, rejected in zip(pairs["prompt_ids"], pairs["chosen_ids"], pairs["rejected_ids"], strict=True):
        for answer in (chosen, rejected):
            length = len(prompt) + len(answer) if max_length is None else min(len(prompt) + len(answer), max_length)
            total += sequence_flops(config, lora_params, length, max(length - len(prompt), 0), backward)
    return total


def trainable_params(model) -> int:
    """The weights that train (the LoRA adapters on a frozen base: `lora_params`' count for the active adapter)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
