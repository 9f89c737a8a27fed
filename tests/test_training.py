"""02_sft / 03_dpo: bad input stops before training; crash safety (SIGTERM, SIGKILL, resume); 8-bit loading."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from aletheia_utils import config, data, dpo, pipeline, sft, training

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "smoke.yaml"


def corpus_rows(n: int) -> list[dict]:
    rows, _ = data.load_rows(sorted((ROOT / "data" / "raw").glob("*_authored.jsonl")), "raw")
    return [{"prompt": r["question"], "response": r["answer"]} for r in rows[:n]]


def make_run(tmp_path: Path, overrides: dict | None = None, n_train: int = 24) -> tuple[Path, Path]:
    """A params file and a run folder holding small curated splits, as 01_curate would leave them."""
    tree = yaml.safe_load(SMOKE.read_text())
    tree["run"]["runs_dir"] = str(tmp_path)
    tree["data"]["raw_glob"] = str(ROOT / "data" / "raw" / "*.jsonl")
    for dotted, value in (overrides or {}).items():
        node = tree
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tree))
    run_dir = tmp_path / "run"
    curated = run_dir / "01_curate"
    curated.mkdir(parents=True)
    rows = corpus_rows(n_train + 6)
    data.write_jsonl(curated / "sft.jsonl", rows[:n_train])
    data.write_jsonl(curated / "sft_val.jsonl", rows[n_train:])
    return params, run_dir


def build(params: Path, run_dir: Path, builder=sft.build_trainer):
    cfg = config.load(params)
    return builder(cfg, pipeline.RunPaths.for_run(cfg, run_dir))


@pytest.mark.parametrize("setup, overrides, error, message", [
    (lambda d: (d / "sft.jsonl").unlink(), {}, data.SplitError, "sft.jsonl: split not found (run 01_curate first)"),
    (lambda d: (d / "sft_val.jsonl").write_text(""), {}, data.SplitError, "sft_val.jsonl: split is empty"),
    (lambda d: (d / "sft.jsonl").write_text('{"prompt": "p"}\n'), {}, data.SplitError,
     "sft.jsonl:1: response: missing"),
    (lambda d: None, {"sft.lora.target_modules": ["q_proj", "qkv_proj"]}, training.TrainingDataError,
     "sft.lora.target_modules: the model has no module named qkv_proj; its linear layers are"),
    (lambda d: None, {"sft.init_adapter": "/nonexistent/adapter"}, training.TrainingDataError,
     "sft.init_adapter: /nonexistent/adapter is not an adapter folder"),
    (lambda d: None, {"sft.overlong": "fail", "sft.max_seq_length": 64}, training.TrainingDataError,
     "example(s) are longer than max_seq_length=64 tokens"),
])
def test_bad_sft_input_stops_before_training(tmp_path, setup, overrides, error, message):
    params, run_dir = make_run(tmp_path, overrides)
    setup(run_dir / "01_curate")
    with pytest.raises(error) as err:
        build(params, run_dir)
    assert message in str(err.value)
    assert not (run_dir / "02_sft" / "checkpoints").exists() or not any((run_dir / "02_sft" / "checkpoints").iterdir())


def test_overlong_rows_are_counted_and_dropped(tmp_path):
    params, run_dir = make_run(tmp_path, {"sft.max_seq_length": 330})
    trainer, info = build(params, run_dir)
    assert info["overlong"]["train"] > 0 and info["train_rows"] == 24 - info["overlong"]["train"]
    choice = info["precision_choice"]  # smoke params: run.device cpu, precision auto -> measured, recorded
    assert info["device"] == "cpu" and trainer.args.use_cpu and choice["by"] == "measured"
    assert choice["precision"] == info["precision"] == ("bf16" if trainer.args.bf16 else "fp32")
    assert choice["precision"] == training.faster_precision(choice["bf16_gflops"], choice["fp32_gflops"])


def test_neftune_noise_alpha_reaches_the_trainer(tmp_path):
    trainer, _ = build(*make_run(tmp_path, {"sft.neftune_noise_alpha": 5.0}))
    assert trainer.args.neftune_noise_alpha == 5.0
    assert {type(m) for m in trainer.model.modules() if "Dropout" in type(m).__name__} == {training.SharedDropout}
    (tmp_path / "off").mkdir()
    assert build(*make_run(tmp_path / "off"))[0].args.neftune_noise_alpha is None  # off unless set


def _never():
    raise AssertionError("measured although the choice did not need it")


@pytest.mark.parametrize("bf16, fp32, chosen", [
    (160.0, 330.0, "fp32"),  # AVX512-BF16 without AMX: bf16 at half fp32's speed
    (1900.0, 330.0, "bf16"),  # AMX: bf16 several times fp32
    (340.0, 330.0, "fp32"),  # a near tie keeps fp32's precision (and does not flip between runs on noise)
    (370.0, 330.0, "bf16"),
])
def test_auto_precision_takes_the_faster_measured_matmul(bf16, fp32, chosen):
    figures = {"bf16_gflops": bf16, "fp32_gflops": fp32}
    assert training.choose_precision("auto", "cpu", lambda: figures) == {"precision": chosen, "by": "measured",
                                                                         **figures}


def test_precision_set_in_the_params_or_on_a_gpu_is_not_measured(monkeypatch):
    assert training.choose_precision("fp32", "cpu", _never) == {"precision": "fp32", "by": "params"}
    assert training.choose_precision("bf16", "cuda", _never) == {"precision": "bf16", "by": "params"}
    import torch

    for supported, chosen in ((True, "bf16"), (False, "fp16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert training.choose_precision("auto", "cuda", _never) == {"precision": chosen, "by": "GPU support"}


def test_the_matmul_measurement_is_cheap():
    started = time.perf_counter()
    figures = training.measure_gemm.__wrapped__()
    assert time.perf_counter() - started < 1.0 and set(figures) == {"bf16_gflops", "fp32_gflops"}
    assert all(v > 0 for v in figures.values())


def test_run_device_decides_where_training_runs():
    import torch

    assert training.training_device("cpu") == "cpu"
    assert training.training_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    tree = yaml.safe_load(SMOKE.read_text())
    assert training.training_args(config.SFT(**tree["sft"]), Path("x"), 0, "fp32", "cpu")["use_cpu"] is True
    if not torch.cuda.is_available():
        with pytest.raises(training.TrainingDataError, match="run.device: cuda, but torch sees no CUDA device"):
            training.training_device("cuda")


def test_dpo_needs_the_sft_adapter(tmp_path):
    params, run_dir = make_run(tmp_path)
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "It depends."} for r in corpus_rows(4)]
    for name in ("dpo.jsonl", "dpo_val.jsonl"):
        data.write_jsonl(run_dir / "01_curate" / name, pairs)
    with pytest.raises(training.TrainingDataError, match="no SFT adapter"):
        build(params, run_dir, dpo.build_trainer)


def sft_adapter_and_pairs(params: Path, run_dir: Path) -> list[dict]:
    """What 03 starts from: an SFT adapter after one step, and three curated pairs (rejected: "It depends.") as
    01's train and validation pairs; returns the pairs."""
    trainer, _ = build(params, run_dir)
    training.fit(trainer, run_dir / "02_sft" / "checkpoints")
    training.save_adapter(trainer, trainer.processing_class, run_dir / "02_sft" / "adapter")
    pairs = [{"prompt": r["prompt"], "chosen": r["response"], "rejected": "It depends."} for r in corpus_rows(3)]
    for name in ("dpo.jsonl", "dpo_val.jsonl"):
        data.write_jsonl(run_dir / "01_curate" / name, pairs)
    return pairs


@pytest.mark.slow
def test_dpo_sft_weight_adds_the_chosen_answers_nll(tmp_path):
    params, run_dir = make_run(tmp_path, {"sft.max_steps": 1}, n_train=4)
    sft_adapter_and_pairs(params, run_dir)
    losses = {}
    for weight in (0.0, 1.0):
        cfg = config.load(params, {"dpo.sft_weight": weight})
        trainer, info = dpo.build_trainer(cfg, pipeline.RunPaths.for_run(cfg, run_dir))
        assert info["sft_weight"] == weight
        losses[weight] = trainer.evaluate()["eval_loss"]
    assert losses[0.0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference: the DPO loss is log 2
    assert losses[1.0] - losses[0.0] > 1.0, losses  # + the chosen answers' per-token NLL (a few nats)


@pytest.mark.slow
def test_dpo_on_policy_pairs_are_the_sft_models_own_answers(tmp_path):
    params, run_dir = make_run(tmp_path, {"sft.max_steps": 1, "data.rejected_max_tokens": 24}, n_train=4)
    pairs = sft_adapter_and_pairs(params, run_dir)
    cfg = config.load(params, {"dpo.rejected": "policy"})
    paths = pipeline.RunPaths.for_run(cfg, run_dir)
    made = dpo.policy_pairs(cfg, paths)
    rows = data.load_split(made["dpo"], "dpo")
    assert [r["chosen"] for r in rows] == [p["chosen"] for p in pairs]
    assert {r["rejected_source"] for r in rows} == {"sft_policy"} and "It depends." not in {r["rejected"] for r in rows}
    assert max(r["rejected"].count(" ") for r in rows) < 40  # cut at data.rejected_max_tokens = 24
    stamp = made["dpo"].stat().st_mtime_ns
    assert dpo.policy_pairs(cfg, paths) == made and made["dpo"].stat().st_mtime_ns == stamp  # same inputs: reused
    _, info = dpo.build_trainer(cfg, paths)
    assert info["rejected"] == "policy" and info["train_pairs"] == len(rows)
    again = config.load(params, {"dpo.rejected": "policy", "dpo.rejected_sampling.repeat_penalty": 1.3})
    dpo.policy_pairs(again, paths)
    assert made["dpo"].stat().st_mtime_ns != stamp  # another decoding: made again


@pytest.mark.slow
def test_dpo_follows_the_markers_format_from_the_policys_answers_to_training(tmp_path, monkeypatch):
    """`data.prompt_format: markers` through 02 and 03 (on-policy pairs, as the smoke run): the SFT policy is asked
    in the markers format, and DPO trains on markers text whose answers end with EOS, as SFT did."""
    params, run_dir = make_run(tmp_path, {"data.prompt_format": "markers", "sft.max_steps": 1,
                                          "data.rejected_max_tokens": 24, "dpo.max_steps": 1}, n_train=4)
    sft_adapter_and_pairs(params, run_dir)
    asked, server_answers = [], dpo.generation.server_answers

    def recorded(*args, **kwargs):
        asked.append(kwargs.get("style"))
        return server_answers(*args, **kwargs)

    monkeypatch.setattr(dpo.generation, "server_answers", recorded)
    cfg = config.load(params)
    assert cfg.dpo.rejected == "policy"
    trainer, info = dpo.build_trainer(cfg, pipeline.RunPaths.for_run(cfg, run_dir))
    assert asked == ["markers"]
    rows = data.load_split(run_dir / "03_dpo" / "pairs" / "dpo.jsonl", "dpo")
    assert {r["rejected_source"] for r in rows} == {"sft_policy"} and info["train_pairs"] == len(rows) > 0
    tok = trainer.processing_class
    for row, pair in zip(rows, trainer.train_dataset, strict=True):
        prompt = tok(data.format_prompt(row["prompt"], "markers"), add_special_tokens=False).input_ids
        assert pair["prompt_ids"] == prompt and pair["chosen_ids"][-1] == pair["rejected_ids"][-1] == tok.eos_token_id
    output, _ = training.fit(trainer, run_dir / "03_dpo" / "checkpoints")
    assert trainer.state.global_step == 1 and output.training_loss > 0


@pytest.mark.slow
def test_lora_trains_on_an_8bit_base(tmp_path):
    params, run_dir = make_run(tmp_path, {"sft.load_in_8bit": True, "sft.max_steps": 1, "sft.precision": "fp32"},
                               n_train=4)
    trainer, _ = build(params, run_dir)
    assert any("Linear8bitLt" in type(m).__name__ for m in trainer.model.modules())
    output, _ = training.fit(trainer, run_dir / "02_sft" / "checkpoints")
    assert trainer.state.global_step == 1 and output.training_loss > 0


def _start(params: Path, run_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "aletheia_utils.sft", "--params", str(params), "--run-dir",
                             str(run_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        if any(r.get("step", -1) >= step and "loss" in r for r in training.read_metrics(metrics)):
            return
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.slow
def test_sigterm_saves_sigkill_resumes_and_the_newest_checkpoint_survives(tmp_path):
    params, run_dir = make_run(tmp_path, {"sft.max_steps": 8, "sft.save_steps": 2, "sft.save_total_limit": 1,
                                          "sft.eval_steps": 100, "sft.logging_steps": 1})
    ckpts, metrics = run_dir / "02_sft" / "checkpoints", run_dir / "02_sft" / "metrics.jsonl"

    first = _start(params, run_dir)  # SIGTERM: save a resumable checkpoint and exit cleanly
    _wait_for_step(first, metrics, 1)
    first.send_signal(signal.SIGTERM)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["stopped_by"] == "SIGTERM" and report["global_step"] < 8
    assert [p.name for p in training.complete_checkpoints(ckpts)] == [f"checkpoint-{report['global_step']}"]
    assert not (run_dir / "02_sft" / "adapter").exists()

    (ckpts / "checkpoint-99").mkdir()  # a partial checkpoint (no marker) must be ignored
    second = _start(params, run_dir)  # SIGKILL mid-run: nothing gets to clean up
    _wait_for_step(second, metrics, report["global_step"] + 2)
    newest_before_kill = training.complete_checkpoints(ckpts)[-1]
    os.kill(second.pid, signal.SIGKILL)
    second.wait(timeout=60)
    done = training.complete_checkpoints(ckpts)
    # the newest survives; a kill between saving it and rotating the one before leaves that one too
    assert done and done[-1] >= newest_before_kill and len(done) <= 2, done

    third = _start(params, run_dir)
    out, err = third.communicate(timeout=600)
    assert third.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["resumed_from"] == str(done[-1]) and final["global_step"] == 8 and final["stopped_by"] is None
    assert (run_dir / "02_sft" / "adapter" / "adapter_model.safetensors").is_file()
    assert len(training.complete_checkpoints(ckpts)) == 1, "save_total_limit: only the newest is kept"
    assert not (ckpts / "checkpoint-99").exists() and not (ckpts / ".staging").exists()
    steps = [r["step"] for r in training.read_metrics(metrics) if "loss" in r and "train_loss" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8, "a resumed run continues the metrics, no repeats"


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_nothing_partial_and_the_next_run_resumes(tmp_path, monkeypatch):
    import torch

    params, run_dir = make_run(tmp_path, {"sft.max_steps": 2, "sft.save_steps": 1, "sft.eval_steps": 100,
                                          "sft.logging_steps": 1}, n_train=4)
    ckpts = run_dir / "02_sft" / "checkpoints"
    save = torch.save

    def disk_full_at_step_2(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f):  # the file is cut short, as a full disk leaves it
            Path(f).write_bytes(b"\x80\x02")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_2)
    trainer, _ = build(params, run_dir)
    with pytest.raises(training.CheckpointError) as err:
        training.fit(trainer, ckpts)
    assert str(err.value) == (f"{ckpts / 'checkpoint-2'}: the checkpoint could not be written (no space left on the "
                              "device); nothing of it was kept, and the next run resumes from "
                              f"{ckpts / 'checkpoint-1'}")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-1"], "no partial checkpoint-2, no staging"
    assert [p.name for p in training.complete_checkpoints(ckpts)] == ["checkpoint-1"]

    monkeypatch.setattr(torch, "save", save)  # space again
    trainer, _ = build(params, run_dir)
    _, resumed = training.fit(trainer, ckpts)
    assert resumed == str(ckpts / "checkpoint-1") and trainer.state.global_step == 2
    assert [p.name for p in training.complete_checkpoints(ckpts)] == ["checkpoint-1", "checkpoint-2"]


class _Saves:
    """Stands in for a PEFT model or a tokenizer: `save_pretrained` writes one file, or fails like a full disk."""

    def __init__(self, name: str, full: bool = False):
        self.name, self.full = name, full

    def save_pretrained(self, folder, **_):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / self.name).write_text("new")
        if self.full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_save_adapter_replaces_the_folder_only_with_a_complete_adapter(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("old")
    trainer = type("Trainer", (), {"model": _Saves("adapter_model.safetensors")})()
    with pytest.raises(training.CheckpointError) as err:
        training.save_adapter(trainer, _Saves("tokenizer.json", full=True), target)
    assert str(err.value) == (f"{target}: the adapter could not be written (no space left on the device); "
                              "nothing of it was kept")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary left beside it"
    assert [p.name for p in target.iterdir()] == ["adapter_model.safetensors"]
    assert (target / "adapter_model.safetensors").read_text() == "old", "the earlier adapter survives"

    assert training.save_adapter(trainer, _Saves("tokenizer.json"), target) == target
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert {p.name: p.read_text() for p in target.iterdir()} == {"adapter_model.safetensors": "new",
                                                               "tokenizer.json": "new"}


class _Evaluates:
    """A trainer stand-in: a log history, a global step and an `evaluate` that counts its calls."""

    def __init__(self, log_history, global_step):
        self.state = type("State", (), {"log_history": log_history, "global_step": global_step})()
        self.calls = 0

    def evaluate(self):
        self.calls += 1
        return {"eval_loss": 1.0}


def test_final_evaluation_evaluates_only_when_the_schedule_did_not_at_the_last_step():
    logged = {"eval_loss": 2.0, "epoch": 0.5, "step": 30}
    at_last = _Evaluates([{"loss": 3.0, "step": 30}, logged, {"train_loss": 3.0, "step": 30}], global_step=30)
    assert training.final_evaluation(at_last) == logged and at_last.calls == 0
    earlier = _Evaluates([{"eval_loss": 2.5, "step": 20}], global_step=30)
    assert training.final_evaluation(earlier) == {"eval_loss": 1.0} and earlier.calls == 1


def test_rank_reports_are_found_even_inside_another_ranks_log_line():
    one = '{"rank": 1, "world_size": 2, "train_loss": 3.5}'
    stdout = "{'eval_loss': '4.0'}\n{'loss': '3.7', " + one + "\n'epoch': '1'}\n" + one.replace("1,", "0,", 1) + "\n"
    assert [r["rank"] for r in training.rank_reports(stdout)] == [1, 0]


@pytest.mark.slow
def test_accelerate_runs_sft_as_two_cpu_processes(tmp_path):
    params, run_dir = make_run(tmp_path, {"sft.launcher": "accelerate", "sft.max_steps": 2, "sft.eval_steps": 100,
                                          "sft.save_steps": 100}, n_train=12)
    cfg = config.load(params)
    assert cfg.sft.accelerate_config == str(ROOT / "params" / "accelerate" / "ddp_cpu.yaml")
    reports = training.run_accelerate(cfg, pipeline.RunPaths.for_run(cfg, run_dir), "02_sft")
    assert sorted(r["rank"] for r in reports) == [0, 1] and {r["world_size"] for r in reports} == {2}
    assert {r["global_step"] for r in reports} == {2}, "both ranks stepped together"
    adapters = [p for p in run_dir.rglob("adapter_model.safetensors") if "checkpoints" not in p.parts]
    assert adapters == [run_dir / "02_sft" / "adapter" / "adapter_model.safetensors"], "one adapter, saved once"
    assert len(training.complete_checkpoints(run_dir / "02_sft" / "checkpoints")) == 1


@pytest.mark.slow
def test_init_adapter_continues_an_existing_adapter(tmp_path):
    params, run_dir = make_run(tmp_path, {"sft.max_steps": 1}, n_train=4)
    trainer, _ = build(params, run_dir)
    training.fit(trainer, run_dir / "02_sft" / "checkpoints")
    first = training.save_adapter(trainer, trainer.processing_class, tmp_path / "first_adapter")
    (tmp_path / "again").mkdir()
    params2, run_dir2 = make_run(tmp_path / "again", {"sft.max_steps": 1, "sft.init_adapter": str(first)}, n_train=4)
    trainer2, info = build(params2, run_dir2)
    assert info["init_adapter"] == str(first)
    import torch
    from safetensors.torch import load_file

    saved = load_file(first / "adapter_model.safetensors")
    loaded = {n: p for n, p in trainer2.model.named_parameters() if "lora_B" in n}
    assert loaded and all(p.requires_grad for p in loaded.values())
    assert any(torch.count_nonzero(p) for p in loaded.values()), "starts from the trained B, not from zero"
    assert len(saved) == len([n for n, _ in trainer2.model.named_parameters() if "lora_" in n])


def _tiny_lora_model(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2))
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets))


def test_lora_dropout_masks_are_shared_by_the_adapters_reading_one_input():
    model = _tiny_lora_model(0.5)
    assert training.share_dropout_masks(model) == 2 * 7
    outputs = {}
    for name, module in model.named_modules():
        if name.endswith("lora_dropout.default"):
            proj = name.split(".")[-3]
            module.register_forward_hook(lambda m, i, o, key=proj: outputs.setdefault(key, (i[0], o)) and None)
    model.train()
    ids = torch.randint(0, 64, (1, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    q_in, q = outputs["q_proj"]
    assert outputs["k_proj"][1] is q and outputs["v_proj"][1] is q, "q, k and v share one mask"
    assert outputs["up_proj"][1] is outputs["gate_proj"][1], "gate and up share one mask"
    assert outputs["o_proj"][1] is not q and outputs["down_proj"][1] is not outputs["gate_proj"][1]
    dropped = (q == 0).float().mean().item()
    assert 0.35 < dropped < 0.65 and torch.allclose(q[q != 0], 2 * q_in[q != 0]), "dropout p=0.5, scaled by 1/(1-p)"
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    model.eval()
    with torch.no_grad():
        shared = model(input_ids=ids).logits
        assert torch.equal(shared, _tiny_lora_model(0.5).eval()(input_ids=ids).logits), "no dropout in evaluation"


def test_the_16bit_dropout_mask_drops_p_of_the_elements_and_scales_the_rest():
    x = torch.ones(1_000_001)  # odd: the last int32 draw is half used
    torch.manual_seed(3)
    out = training.dropout_16bit(x, 0.05)
    torch.manual_seed(3)
    assert torch.equal(out, training.dropout_16bit(x, 0.05)), "the mask follows torch's seed"
    assert out.shape == x.shape and torch.equal(out.unique(), torch.tensor([0.0, 1 / 0.95]))
    for half in (out[0::2], out[1::2]):  # the low 16 bits and the high 15 of each draw
        assert abs((half == 0).float().mean().item() - 0.05) < 0.0015  # 5 standard deviations
    y = torch.randn(64, 77, dtype=torch.bfloat16)
    dropped = training.dropout_16bit(y, 0.5)
    assert dropped.dtype == torch.bfloat16 and 0.4 < (dropped == 0).float().mean().item() < 0.6
    kept = dropped != 0
    assert torch.equal(dropped[kept], (y[kept].float() * 2).bfloat16())
