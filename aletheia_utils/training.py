"""The training plumbing 02_sft and 03_dpo share: precision, model loading, data-length checks, per-step
monitoring, crash-safe checkpoints, a clean stop on SIGTERM/SIGINT, and running a stage in this process or under
`accelerate launch`.

The stage modules (`sft`, `dpo`) build their trainers from these pieces; `python -m aletheia_utils.sft|dpo` runs a
stage outside a notebook through `run_main` (the crash-safety test kills that process).
"""

from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import config as config_mod
from . import data, files, models, pipeline

COMPLETE = "COMPLETE"  # marker file: this checkpoint was fully written and synced


class TrainingDataError(ValueError):
    """Training input that cannot be used; raised before training starts."""


# ---------------------------------------------------------------- precision and model

GEMM_SHAPE = (512, 576, 1536)  # tokens x hidden -> MLP width: one up-projection of the embedded model on a packed row
BF16_MARGIN = 1.1  # bf16 must be this much faster: it costs precision, and a near tie would flip between runs on noise


def training_device(setting: str = "auto") -> str:
    """`run.device` as "cuda" or "cpu": auto takes CUDA when torch sees a device; asking for CUDA without one raises."""
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise TrainingDataError("run.device: cuda, but torch sees no CUDA device (set auto or cpu)")
    return setting


def gemm_gflops(dtype, shape: tuple[int, int, int] = GEMM_SHAPE, reps: int = 5, budget_s: float = 0.25) -> float:
    """GFLOP/s of one model-shaped CPU matmul in `dtype` with torch's current thread count: the best of `reps` after a
    warm-up, cut short once `budget_s` is spent (an emulated bf16 matmul can be slow)."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(dtype), torch.randn(k, n, generator=gen).to(dtype)
    torch.mm(a, b)
    best, start = float("inf"), time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return 2 * m * k * n / best / 1e9


@functools.cache
def measure_gemm(threads: int | None = None) -> dict[str, float]:
    """The model-shaped matmul's speed in bf16 and fp32 on this CPU at torch's thread count, measured once per
    process and `threads` (the cache key: pass `torch.get_num_threads()`, as training will run)."""
    return {"bf16_gflops": round(gemm_gflops(torch.bfloat16), 1), "fp32_gflops": round(gemm_gflops(torch.float32), 1)}


def faster_precision(bf16_gflops: float, fp32_gflops: float) -> str:
    """bf16 when its measured matmul beats fp32's by `BF16_MARGIN`, else fp32. CPU flags do not decide it: on some
    AVX512-BF16 CPUs without AMX a bf16 GEMM runs at half fp32's speed, on AMX CPUs at several times it."""
    return "bf16" if bf16_gflops >= BF16_MARGIN * fp32_gflops else "fp32"


def choose_precision(setting: str, device: str = "cpu", measure=None) -> dict:
    """The training precision and how it was chosen: `{"precision", "by"}`, plus the two measured figures when
    `auto` on a CPU timed a bf16 and an fp32 matmul (`measure()`, default `measure_gemm` at torch's threads) and took
    the faster. On CUDA `auto` is bf16 where the GPU supports it, else fp16; any other setting is taken as given."""
    if setting != "auto":
        return {"precision": setting, "by": "params"}
    if device == "cuda":
        return {"precision": "bf16" if torch.cuda.is_bf16_supported() else "fp16", "by": "GPU support"}
    figures = measure() if measure else measure_gemm(torch.get_num_threads())
    return {"precision": faster_precision(**figures), "by": "measured", **figures}


def resolve_precision(setting: str, device: str = "auto") -> str:
    """`choose_precision`'s choice alone (`device` as `run.device`)."""
    return choose_precision(setting, training_device(device))["precision"]


def load_base(base_model: str, load_in_8bit: bool = False, precision: str = "fp32", device: str = "auto"):
    """(model, tokenizer): the base in fp32, or 8-bit with bitsandbytes. For bf16 training the frozen base is held
    in bf16 (autocast would cast every weight on every step); the LoRA weights PEFT adds stay fp32 master weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    path = models.resolve(base_model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    kwargs = {"dtype": torch.bfloat16 if precision == "bf16" and not load_in_8bit else torch.float32}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": 0} if training_device(device) == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model, tokenizer


def check_target_modules(model, targets: list[str]) -> None:
    """Fail before training if a LoRA target module name does not exist in the model."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__.endswith("Linear")})
        raise TrainingDataError(f"sft.lora.target_modules: the model has no module named {', '.join(missing)}; "
                                f"its linear layers are {', '.join(linear)}")


def lora_kwargs(lora: config_mod.Lora) -> dict:
    """`sft.lora` in PEFT's `LoraConfig` names: ΔW = (alpha/r)·B·A on each target module, biases untouched."""
    return dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM")


# ---------------------------------------------------------------- data

def apply_overlong(rows: list[dict], texts: list[str], tokenizer, max_len: int, policy: str) -> tuple[list[dict], int]:
    """Rows whose formatted text exceeds `max_len` tokens are dropped, left to the trainer's truncation, or
    fail the stage (`policy`); returns the rows kept and how many were over."""
    lengths = data.token_lengths(texts, tokenizer)
    over = {i for i, n in enumerate(lengths) if n > max_len}
    if over and policy == "fail":
        raise TrainingDataError(f"{len(over)} example(s) are longer than max_seq_length={max_len} tokens "
                                f"(longest {max(lengths)}); set overlong to drop or truncate")
    return ([r for i, r in enumerate(rows) if i not in over] if policy == "drop" else rows), len(over)


# ---------------------------------------------------------------- monitoring

def peak_memory_mb() -> float:
    """CUDA max allocated on GPU, else the process's peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class MetricsCallback(TrainerCallback):
    """Appends one JSON line per log event to `metrics.jsonl`: the trainer's own numbers (loss, eval_loss,
    learning_rate, grad_norm, DPO rewards …) plus tokens/s, samples/s and peak memory since the last line."""

    def __init__(self, path: Path):
        self.path = path
        self._last = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = (time.perf_counter(), state.num_input_tokens_seen or 0, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen or 0
        record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(),
                  **{k: v for k, v in logs.items() if isinstance(v, int | float)}}
        t0, tok0, step0 = self._last or (now, tokens, state.global_step)
        if "loss" in logs and now > t0 and state.global_step > step0:
            samples = (state.global_step - step0) * args.per_device_train_batch_size * \
                args.gradient_accumulation_steps * args.world_size
            record |= {"tokens_per_s": (tokens - tok0) / (now - t0), "samples_per_s": samples / (now - t0)}
            self._last = (now, tokens, state.global_step)
        record["peak_memory_mb"] = peak_memory_mb()
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8")] if path.exists() else []


class StopOnSignal(TrainerCallback):
    """SIGTERM or SIGINT: finish the current step, save a checkpoint, stop training cleanly."""

    def __init__(self):
        self.received = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------- speed

def dropout_16bit(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout whose mask takes 16 random bits an element instead of torch's one Mersenne Twister draw each
    (half the draws, 2× faster on a CPU). One int32 draw (`random_()`, 31 bits) gives two elements: the low half's 16
    bits and the high half's 15, each compared with its own threshold, so an element is dropped with p to within
    2e-5 (0.05: 0.050003 and 0.049988); the kept ones are scaled by 1/(1-p)."""
    n = x.numel()
    halves = torch.empty((n + 1) // 2, dtype=torch.int32).random_().view(torch.int16).view(-1, 2)
    thresholds = torch.tensor([round(p * 65536) - 32768, round(p * 32768)], dtype=torch.int16)
    keep = (halves >= thresholds).view(-1)[:n].view(x.shape)
    return x.mul(keep).mul_(1 / (1 - p))


class SharedDropout(torch.nn.Dropout):
    """LoRA's input dropout with one mask per input tensor: adapters that read the same input (q, k and v; gate and
    up) share the mask drawn for the first of them instead of drawing their own, and on a CPU the mask is drawn from
    16 random bits an element (`dropout_16bit`). Each adapter still sees dropout `p`; drawing masks (torch's CPU
    Mersenne Twister, element by element) was 17% of SFT's CPU time."""

    _last: tuple = (None, None)  # (input, output) of the latest call, for the next adapter reading the same input

    def forward(self, x):
        if not self.training or self.p == 0:
            return super().forward(x)
        last_in, last_out = SharedDropout._last
        if x is last_in and last_out.shape == x.shape:
            return last_out
        out = self.draw(x)
        SharedDropout._last = (x, out)
        return out

    def draw(self, x):
        """A freshly dropped copy of `x`."""
        fast = x.device.type == "cpu" and self.p < 1 and sys.byteorder == "little"  # the halves' order
        return dropout_16bit(x, self.p) if fast else super().forward(x)


def share_dropout_masks(model) -> int:
    """Swap every LoRA input dropout of `model` for a `SharedDropout` of the same `p`; returns how many."""
    swapped = 0
    for module in model.modules():
        for name, dropout in getattr(module, "lora_dropout", {}).items():
            if type(dropout) is torch.nn.Dropout:
                module.lora_dropout[name] = SharedDropout(dropout.p)
                swapped += 1
    return swapped


class FastStepMixin:
    """LoRA's input dropout masks shared by the adapters reading one input (`SharedDropout`), and under bf16 autocast
    the LoRA branch takes the bf16 activations as they come: PEFT would otherwise copy each adapter input to fp32
    (its master weights' dtype), and autocast cast it back to bf16 for the matmul."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        share_dropout_masks(self.model)

    def training_step(self, model, inputs, num_items_in_batch=None):
        from peft.helpers import disable_input_dtype_casting

        with disable_input_dtype_casting(model, active=self.args.bf16):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        from peft.helpers import disable_input_dtype_casting

        with disable_input_dtype_casting(model, active=self.args.bf16):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)


class PlainLossMixin:
    """On a CPU, SFT takes transformers' own causal-LM loss (full logits, one cross-entropy) instead of TRL's chunked
    LM head: that head's torch fallback (Triton is GPU-only) makes a dozen fp32 passes over every logits tile and
    costs ~3x more, and it also computes the entropy and token accuracy metrics that nothing here reads."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.args.device.type != "cpu":
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from transformers import Trainer

        return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)


# ---------------------------------------------------------------- crash-safe checkpoints

def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fingerprint(*parts, files: tuple[Path, ...] = ()) -> str:
    """What a checkpoint was trained from: settings and input file hashes. Only a matching one is resumed."""
    h = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for f in files:
        h.update(data.sha256(f).encode())
    return h.hexdigest()[:16]


def complete_checkpoints(output_dir: Path, fingerprint: str | None = None) -> list[Path]:
    """Checkpoints marked complete (for `fingerprint`, if given), oldest first; partial ones are ignored."""
    found = []
    for p in output_dir.glob("checkpoint-*"):
        marker = p / COMPLETE
        if p.name[11:].isdigit() and marker.is_file() and (
                fingerprint is None or json.loads(marker.read_text()).get("fingerprint") == fingerprint):
            found.append(p)
    return sorted(found, key=lambda p: int(p.name[11:]))


class CheckpointError(RuntimeError):
    """A checkpoint (or the adapter) could not be written, e.g. on a full disk; nothing partial is left behind."""


def _write_failure(e: BaseException) -> str:
    """Why a write failed, in a few words: 'no space left on the device' wherever in the chain ENOSPC shows."""
    chain, cause = [], e
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    if any(getattr(c, "errno", None) == errno.ENOSPC or "No space left" in str(c) for c in chain):
        return "no space left on the device"
    return f"{type(e).__name__}: {e}"


class CrashSafeMixin:
    """Checkpoints are written into a staging folder, fsynced, marked complete and renamed into place;
    rotation deletes the oldest complete checkpoints beyond `save_total_limit` (never the newest) and any
    partial ones. `fingerprint` (what the run was trained from, see `fingerprint()`) is recorded in each marker."""

    def __init__(self, *args, fingerprint: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint

    def _save_checkpoint(self, model, trial):
        final_root = Path(self.args.output_dir)
        staging_root = final_root / ".staging"
        name = f"checkpoint-{self.state.global_step}"
        staged, final = staging_root / name, final_root / name
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.args.output_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)  # every rank writes its part (e.g. its RNG state)
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                (staged / COMPLETE).write_text(json.dumps({"step": self.state.global_step, "time": time.time(),
                                                           "fingerprint": self.fingerprint}))
                _fsync_tree(staged)
        except Exception as e:  # a full disk surfaces as OSError, torch's RuntimeError or safetensors' own error
            shutil.rmtree(staging_root, ignore_errors=True)  # nothing partial stays, and its space is freed
            newest = complete_checkpoints(final_root, self.fingerprint)
            raise CheckpointError(
                f"{final}: the checkpoint could not be written ({_write_failure(e)}); nothing of it was kept, and the "
                f"next run resumes from {newest[-1] if newest else 'the start (no complete checkpoint yet)'}") from e
        finally:
            self.args.output_dir = str(final_root)
        if not self.args.should_save:
            return
        if final.exists():
            shutil.rmtree(final)
        staged.rename(final)
        shutil.rmtree(staging_root, ignore_errors=True)
        _fsync_tree(final_root)
        done = complete_checkpoints(final_root)
        for old in done[:-self.args.save_total_limit] if self.args.save_total_limit else []:
            shutil.rmtree(old)
        for partial in final_root.glob("checkpoint-*"):
            if partial.is_dir() and not (partial / COMPLETE).exists():
                shutil.rmtree(partial)


def fit(trainer, output_dir: Path):
    """Train, resuming from the newest complete checkpoint made from the same inputs and settings.

    Checkpoints of other settings are removed. A fresh start clears `metrics.jsonl` and first evaluates the
    untrained model (the step-0 baseline); a resume keeps the metrics up to its step; the last step is always
    evaluated. Returns (train output, the checkpoint resumed from or None).
    """
    ours = complete_checkpoints(output_dir, trainer.fingerprint)
    resume = ours[-1] if ours else None
    if trainer.args.should_save:  # the main process tidies up; the others wait for it
        for stale in set(output_dir.glob("checkpoint-*")) - set(ours):
            shutil.rmtree(stale)
        metrics = next(cb.path for cb in trainer.callback_handler.callbacks if isinstance(cb, MetricsCallback))
        step = int(resume.name[11:]) if resume else -1
        kept = [r for r in read_metrics(metrics) if r["step"] <= step]
        metrics.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    trainer.accelerator.wait_for_everyone()
    if resume is None and trainer.eval_dataset is not None:
        trainer.evaluate()
    output = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if trainer.eval_dataset is not None:
        final_evaluation(trainer)
    return output, str(resume) if resume else None


def final_evaluation(trainer) -> dict:
    """The validation metrics at the last step: the schedule's, when it evaluated there, else one `evaluate()` now.
    The same on all ranks."""
    logged = max((h for h in trainer.state.log_history if "eval_loss" in h), key=lambda h: h["step"], default=None)
    if logged is not None and logged["step"] == trainer.state.global_step:
        return logged
    return trainer.evaluate()


def validation_curve(records: list[dict], key: str = "eval_loss") -> list[float]:
    """One validation metric (`eval_loss`, or e.g. DPO's `eval_rewards/accuracies`) over a stage's metrics lines,
    one value per evaluated step, the step-0 baseline first."""
    by_step = {r["step"]: r[key] for r in records if key in r}
    return [by_step[k] for k in sorted(by_step)]


def save_adapter(trainer, tokenizer, target: Path) -> Path:
    """Save the trained adapter and tokenizer into `target` through `files.atomic_write`: an earlier adapter there
    is replaced only by a complete one."""
    try:
        with files.atomic_write(target) as tmp:
            trainer.model.save_pretrained(tmp, selected_adapters=["default"])  # not DPO's frozen "ref" copy
            tokenizer.save_pretrained(tmp)
    except Exception as e:
        raise CheckpointError(f"{target}: the adapter could not be written ({_write_failure(e)}); "
                              "nothing of it was kept") from e
    return target


# ---------------------------------------------------------------- a stage's trainer, and running it

def training_args(c: config_mod.Train, output_dir: Path, seed: int, precision: str, device: str = "auto") -> dict:
    """TrainingArguments both trainers share, from a params section; `device` as `run.device`."""
    return dict(
        use_cpu=training_device(device) == "cpu",
        output_dir=str(output_dir), per_device_train_batch_size=c.per_device_batch_size,
        per_device_eval_batch_size=c.per_device_batch_size, gradient_accumulation_steps=c.gradient_accumulation_steps,
        learning_rate=c.learning_rate, lr_scheduler_type=c.lr_scheduler,
        warmup_steps=c.warmup_ratio,  # a float < 1 is a fraction of the total steps (transformers 5 drops warmup_ratio)
        weight_decay=c.weight_decay, optim="adamw_torch", num_train_epochs=c.num_epochs, max_steps=c.max_steps,
        logging_steps=c.logging_steps, save_strategy="steps", save_steps=c.save_steps,
        save_total_limit=c.save_total_limit, bf16=precision == "bf16", fp16=precision == "fp16",
        gradient_checkpointing=c.gradient_checkpointing, seed=seed, data_seed=seed,
        report_to="none", include_num_input_tokens_seen=True, dataloader_num_workers=0, disable_tqdm=True,
    )


def callbacks(stage: Path) -> list:
    """Monitoring for a stage folder: metrics.jsonl, TensorBoard logs in `tensorboard/`, and the signal handler."""
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    return [MetricsCallback(stage / "metrics.jsonl"), TensorBoardCallback(SummaryWriter(str(stage / "tensorboard"))),
            StopOnSignal()]


@dataclass
class Prepared:
    """Everything a stage's trainer is built from but the TRL/PEFT config objects themselves: the model, the
    tokenizer, the checked datasets, the keyword arguments of `LoraConfig` (`lora`, None when the model already holds
    its adapter) and of `SFTConfig`/`DPOConfig` (`args`), the monitoring callbacks and the checkpoint fingerprint.
    `info` is what the notebook shows and the metrics file records."""
    model: Any
    tokenizer: Any
    train_dataset: Any
    eval_dataset: Any
    args: dict
    callbacks: list
    fingerprint: str
    info: dict
    lora: dict | None = None


STAGE_MODULES = {"02_sft": "aletheia_utils.sft", "03_dpo": "aletheia_utils.dpo"}  # run as `python -m` by workers


def rank_reports(stdout: str) -> list[dict]:
    """The JSON report each rank printed. The ranks share one stdout pipe, so a report may land mid-way through
    another rank's log line: find them anywhere, not only at line starts."""
    decoder = json.JSONDecoder()
    return [decoder.raw_decode(stdout, m.start())[0] for m in re.finditer(r'\{"rank": ', stdout)]


def run_accelerate(cfg: config_mod.Config, paths: pipeline.RunPaths, stage: str = "02_sft") -> list[dict]:
    """Run a stage's module (`run_main`) to the end under `accelerate launch` with `sft.accelerate_config` (DDP on CPU
    cores, or DeepSpeed/FSDP on GPUs); return each rank's report. A failure raises with the end of its stderr.

    (Not a server: `serve.launch` starts a process that keeps serving and stops it on exit; this one waits for a
    finite job.)"""
    import subprocess
    import sys

    config_mod.save(cfg, paths.params)  # the workers read the run's resolved settings
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", cfg.sft.accelerate_config,
           "-m", STAGE_MODULES[stage], "--params", str(paths.params), "--run-dir", str(paths.root)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    reports = rank_reports(proc.stdout)
    if proc.returncode != 0:
        raise RuntimeError(f"accelerate launch failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return reports


def train(trainer, cfg: config_mod.Config, paths: pipeline.RunPaths, stage: str = "02_sft") -> dict:
    """Fit in this process, or with `sft.launcher: accelerate` as several processes whose saved adapter is
    then loaded into `trainer.model`. Returns steps, train loss, resume point, runtime and process count."""
    if cfg.sft.launcher == "python":
        output, resumed = fit(trainer, paths.stage(stage) / "checkpoints")
        return {"steps": trainer.state.global_step, "train_loss": output.training_loss, "resumed_from": resumed,
                "train_runtime_s": output.metrics.get("train_runtime"), "processes": 1}
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    started = time.perf_counter()
    reports = run_accelerate(cfg, paths, stage)
    main_report = next(r for r in reports if r["rank"] == 0)
    set_peft_model_state_dict(trainer.model, load_file(paths.stage(stage) / "adapter" / "adapter_model.safetensors"))
    return {"steps": main_report["global_step"], "train_loss": main_report["train_loss"],
            "resumed_from": main_report["resumed_from"], "train_runtime_s": time.perf_counter() - started,
            "processes": len(reports)}


def run_main(argv: list[str] | None, build, stage: str) -> int:
    """Shared entry point of `python -m aletheia_utils.sft|dpo`: build, fit (resuming), save the adapter
    unless a signal stopped training, and print one JSON report per rank."""
    parser = argparse.ArgumentParser(description=f"Train {stage} for a run folder outside the notebook.")
    parser.add_argument("--params", required=True)
    parser.add_argument("--run-dir", required=True)
    args = parser.parse_args(argv)
    cfg = config_mod.load(args.params)
    paths = pipeline.RunPaths.for_run(cfg, args.run_dir)
    trainer, _ = build(cfg, paths)
    output, resumed = fit(trainer, paths.stage(stage) / "checkpoints")
    stopped = next(cb.received for cb in trainer.callback_handler.callbacks if isinstance(cb, StopOnSignal))
    if not stopped and trainer.args.should_save:
        save_adapter(trainer, trainer.processing_class, paths.stage(stage) / "adapter")
    print(json.dumps({"rank": trainer.args.process_index, "world_size": trainer.args.world_size,
                      "global_step": trainer.state.global_step, "resumed_from": resumed, "stopped_by": stopped,
                      "train_loss": output.training_loss}), flush=True)
    return 0
