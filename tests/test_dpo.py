"""03_dpo: pairs in the prompt format 02 trained on, measured as the trainer tokenizes them; the plain LM head against
TRL's own: the same loss, gradient and logged statistics; `generate` works."""

import tempfile

import pytest
import torch
from test_training import build, corpus_rows, make_run

from aletheia_utils import data, dpo, training


@pytest.fixture(scope="module", params=["chat_template", "markers"])
def sft_and_dpo(request, tmp_path_factory):
    """02's and 03's trainers in one `data.prompt_format`, both built as the stages build them, on the same question:
    02's first row, and 03's one pair (chosen: that row's answer) from 02's adapter, saved untrained."""
    from trl import DPOConfig

    style = request.param
    params, run_dir = make_run(tmp_path_factory.mktemp(style), {
        "data.prompt_format": style, "sft.packing": False, "sft.max_seq_length": 512, "sft.precision": "fp32",
        "dpo.precision": "fp32", "dpo.rejected": "curated"}, n_train=2)
    sft_trainer, _ = build(params, run_dir)
    training.save_adapter(sft_trainer, sft_trainer.processing_class, run_dir / "02_sft" / "adapter")
    row = corpus_rows(1)[0]
    for name in ("dpo.jsonl", "dpo_val.jsonl"):
        data.write_jsonl(run_dir / "01_curate" / name, [{"prompt": row["prompt"], "chosen": row["response"],
                                                         "rejected": "It depends."}])
    run = build(params, run_dir, dpo.prepare)  # the trainer as build_trainer makes it, minus the reference pass
    dpo_trainer = dpo.CrashSafeDPOTrainer(
        model=run.model, args=DPOConfig(**run.args | {"precompute_ref_log_probs": False}),
        processing_class=run.tokenizer, train_dataset=run.train_dataset, eval_dataset=run.eval_dataset)
    return style, row, sft_trainer, dpo_trainer


def test_dpo_trains_on_the_text_sft_trained_on(sft_and_dpo):
    style, row, sft_trainer, dpo_trainer = sft_and_dpo
    tok, pair, sft_row = dpo_trainer.processing_class, dpo_trainer.train_dataset[0], sft_trainer.train_dataset[0]
    full = tok(data.format_example(row["prompt"], row["response"], style, tok), add_special_tokens=False).input_ids
    prompt = tok(data.format_prompt(row["prompt"], style, tok), add_special_tokens=False).input_ids
    assert pair["prompt_ids"] == prompt and pair["prompt_ids"] + pair["chosen_ids"] == full == sft_row["input_ids"]
    assert sft_row["labels"] == [-100] * len(prompt) + pair["chosen_ids"]  # SFT's targets: DPO's chosen answer
    if style == "markers":
        assert tok.decode(pair["prompt_ids"]).startswith("### Instruction:\n" + row["prompt"])
        assert pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tok.eos_token_id  # TRL's EOS, as SFT's
        assert tok.decode(pair["rejected_ids"]) == "It depends." + tok.eos_token


def test_pairs_are_measured_as_the_trainer_tokenizes_them(sft_and_dpo):
    style, row, _, dpo_trainer = sft_and_dpo
    tok, tokenized = dpo_trainer.processing_class, dpo_trainer.train_dataset[0]
    pair = {"prompt": row["prompt"], "chosen": row["response"], "rejected": "It depends."}
    n = len(tokenized["prompt_ids"]) + len(tokenized["chosen_ids"])  # the longer answer's sequence
    assert dpo.fit_pairs([pair], tok, style, n, "drop") == ([pair], 0)
    assert dpo.fit_pairs([pair], tok, style, n - 1, "drop") == ([], 1)


@pytest.fixture(scope="module")
def trainer():
    """The embedded model with a LoRA adapter that is not the identity, in fp32, and 4 pairs of unequal lengths."""
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from trl import DPOConfig

    torch.manual_seed(0)
    model, tok = training.load_base("embedded:smollm2-135m-instruct")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    rows = corpus_rows(8)
    pairs = [{"prompt": rows[i]["prompt"], "chosen": rows[i]["response"], "rejected": rows[i + 4]["response"]}
             for i in range(4)]
    args = DPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to="none", max_length=512,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], precompute_ref_log_probs=False)
    return dpo.CrashSafeDPOTrainer(model=model, args=args, processing_class=tok,
                                   train_dataset=Dataset.from_list(dpo.records(pairs, "chat_template")))


def _loss_and_grads(trainer, compute_loss):
    model = trainer.model.train()
    model.zero_grad()
    batch = trainer.data_collator([trainer.train_dataset[0]])
    loss = compute_loss(model, batch)
    loss.backward()
    stats = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, stats


def test_the_plain_head_gives_trls_loss_gradient_and_statistics(trainer):
    from trl import DPOTrainer

    assert not getattr(trainer.model.get_base_model(), "plain_head", False)  # TRL's chunked head first
    stock = _loss_and_grads(trainer, lambda m, b: DPOTrainer.compute_loss(trainer, m, b))
    plain = _loss_and_grads(trainer, trainer.compute_loss)
    assert trainer.model.get_base_model().plain_head
    assert plain[0] == pytest.approx(stock[0], abs=1e-5)
    assert stock[1].keys() == plain[1].keys() and len(stock[1]) == 4 * 30  # lora_A and lora_B of 2 modules x 30 layers
    for name, grad in stock[1].items():  # fp32 sums in another order: equal to ~1e-4 of the gradient's size
        assert torch.linalg.norm(plain[1][name] - grad) <= 1e-3 * torch.linalg.norm(grad), name
    assert plain[2].keys() == stock[2].keys() >= {"entropy", "logits/chosen", "mean_token_accuracy", "rewards/margins"}
    for key, value in stock[2].items():
        if key == "num_tokens":  # a running count over both calls
            continue
        assert plain[2][key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    prompt = trainer.processing_class("Hello", return_tensors="pt")  # 03 generates with the trainer's model
    answer = trainer.model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert answer.shape[1] == prompt["input_ids"].shape[1] + 2
