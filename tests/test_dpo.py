"""03_dpo's plain LM head against TRL's own: the same loss, gradient and logged statistics; `generate` works."""

import tempfile

import pytest
import torch
from test_training import corpus_rows

from aletheia_utils import dpo, training


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
    return dpo.CrashSafeDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(dpo.records(pairs)),
                                   processing_class=tok)


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
