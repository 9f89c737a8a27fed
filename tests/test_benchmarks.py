"""benchmarks/common.py: results record project-relative paths; a relative --run-dir works."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import common  # noqa: E402


def _strings(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


def test_results_record_no_absolute_paths():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.json")):
        absolute = [s for s in _strings(json.loads(path.read_text())) if s.startswith("/")]
        assert not absolute, f"{path.name}: {absolute}"
    assert common.relative(ROOT / "runs" / "default-check") == "runs/default-check"


def test_a_relative_run_dir_is_resolved_and_its_scratch_links_do_not_dangle(tmp_path, monkeypatch):
    (tmp_path / "runs" / "r" / "01_curate").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "01_curate" / "sft.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    source = common.source_run("runs/r")
    assert source == tmp_path / "runs" / "r"
    with common.scratch_run(source, "01_curate") as scratch:
        assert (scratch / "01_curate" / "sft.jsonl").is_file()


# ---------------------------------------------------------------- model FLOPs (benchmarks/flops.py)

import flops  # noqa: E402

TINY = dict(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, head_dim=4, num_hidden_layers=2,
            intermediate_size=16, vocab_size=32)


def test_model_flops_per_token_matches_a_hand_count():
    from types import SimpleNamespace

    config = SimpleNamespace(**TINY)
    # per layer: q 8x8, k 8x4, v 8x4, o 8x8, gate/up/down 8x16 each = 64 + 32 + 32 + 64 + 384 = 576; two layers
    assert flops.base_matmul_params(config) == 1152
    # LoRA r=2 on q (8 -> 8) and v (8 -> 4): 2*(8+8) + 2*(8+4) = 56 per layer
    assert flops.lora_params(config, 2, ["q_proj", "v_proj"]) == 112
    # context 2 (a causal 3-token sequence): QK^T and AV are 2*2*2*4 = 32 FLOPs each per layer, 128 for both layers
    forward = 2 * 1152 + 2 * 112 + 2 * 32 * 8 + 128
    assert forward == 3168
    assert flops.model_flops_per_token(config, 112, context=2, backward=False) == forward
    backward = 2 * 1152 + 4 * 112 + 2 * 32 * 8 + 2 * 128  # frozen: input grad; LoRA: input + weight; attention: 2x
    assert flops.model_flops_per_token(config, 112, context=2) == forward + backward == 6688
    # logits for a quarter of the tokens: the head's 2*256 forward and 2*256 backward shrink to a quarter
    assert flops.model_flops_per_token(config, 112, context=2, head_fraction=0.25) == 6688 - 0.75 * 4 * 256
    assert flops.sequence_flops(config, 112, length=3, scored=3) == 3 * 6688


def test_forward_model_flops_match_torchs_flop_counter_on_a_tiny_llama():
    """torch counts every matmul of a forward pass. Eager attention multiplies the whole masked s x s square (each
    token's context is s, no causal halving), so it is compared with context = s; torch's counter has no formula
    for the CPU's fused attention kernel."""
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY, tie_word_embeddings=True, attn_implementation="eager")
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert flops.trainable_params(model) == flops.lora_params(config, 2, ["q_proj", "v_proj"])
    s = 6
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.arange(s)[None], use_cache=False)
    lora = flops.trainable_params(model)
    assert counter.get_total_flops() == s * flops.model_flops_per_token(config, lora, context=s, backward=False)


def test_packed_stats_and_pair_flops_count_scored_tokens_and_causal_context():
    from types import SimpleNamespace

    from datasets import Dataset

    packed = Dataset.from_list([{"input_ids": [1] * 5, "labels": [-100, -100, 3, 4, 5], "seq_lengths": [2, 3]},
                                {"input_ids": [1] * 3, "labels": [-100, 7, 8], "seq_lengths": [3]}])
    stats = flops.packed_stats(packed)
    assert stats["tokens"] == 8 and stats["head_fraction"] == 5 / 8
    assert stats["context"] == (3 + 6 + 6) / 8  # sum over sequences of s(s+1)/2, over the tokens
    config = SimpleNamespace(**TINY)
    pairs = {"prompt_ids": [[1, 2]], "chosen_ids": [[3, 4, 5]], "rejected_ids": [[6]]}
    expected = flops.sequence_flops(config, 0, 5, 3) + flops.sequence_flops(config, 0, 3, 1)
    assert flops.pair_flops(config, 0, pairs, max_length=None, backward=True) == expected
    cut = flops.sequence_flops(config, 0, 4, 2, backward=False) + flops.sequence_flops(config, 0, 3, 1, backward=False)
    assert flops.pair_flops(config, 0, pairs, max_length=4, backward=False) == cut
