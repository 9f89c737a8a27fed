"""One YAML params file per run, validated into typed sections (every notebook's config cell).

Relative paths in a params file are resolved against the folder that holds the file, so a run
started from anywhere (the `aletheia` command, papermill, JupyterLab) reads the same files.
An unknown key, a wrong type or an impossible value raises `ConfigError`, whose lines read
`FILE: key.path: reason`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from . import files

PROJECT = Path(__file__).resolve().parent.parent  # defaults for paths a params file leaves out
QUANT_TYPES = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q4_0", "Q3_K_M", "Q2_K")
IMATRIX = "-imatrix"  # the suffix of a level quantized with the importance matrix: `Q4_K_M-imatrix`


class ConfigError(ValueError):
    """A params file that cannot be used; `str()` is one line per problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Run(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    base_model: str = Field(min_length=1)
    seed: int = 42
    runs_dir: str = str(PROJECT / "runs")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where 02 and 03 train; auto: CUDA if present")
    threads: int | None = Field(default=None, ge=1)


class Split(Section):
    train: float = Field(0.8, gt=0, lt=1)
    validation: float = Field(0.1, ge=0, lt=1)
    eval: float = Field(0.1, gt=0, lt=1)

    @model_validator(mode="after")
    def _sums_to_one(self):
        total = self.train + self.validation + self.eval
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + eval must be 1.0, got {total:g}")
        return self


class Executor(Section):
    """Where 01's at-scale path (`curate_scale`, datatrove) runs: `local` (LocalPipelineExecutor, processes on this
    machine), `ray` (RayPipelineExecutor on the cluster at `ray_address`, or a local one when unset) or `slurm`
    (SlurmPipelineExecutor: one sbatch array job per stage)."""

    kind: Literal["local", "ray", "slurm"] = "local"
    tasks: int = Field(2, ge=1, description="shards of the input: files, or byte ranges of a file")
    workers: int = Field(2, ge=1, description="tasks running at once (local, ray)")
    ray_address: str | None = Field(None, description='"auto", "ray://host:10001", or unset for a local Ray')
    cpus_per_task: int = Field(1, ge=1)
    mem_per_cpu_gb: float = Field(2.0, gt=0)
    slurm_partition: str | None = Field(None, description="required with kind: slurm")
    slurm_time: str = "04:00:00"

    @model_validator(mode="after")
    def _slurm_partition(self):
        if self.kind == "slurm" and not self.slurm_partition:
            raise ValueError("kind: slurm needs slurm_partition")
        return self


class Data(Section):
    raw_glob: str = str(PROJECT / "data" / "raw" / "*.jsonl")
    on_invalid: Literal["fail", "skip"] = "fail"
    domain_topics: dict[str, str] = Field(min_length=1, description="topic -> one-line description")
    offtopic_topics: dict[str, str] = Field(min_length=1, description="everyday subjects the domain is not")
    split: Split = Split()
    min_answer_tokens: int = Field(40, ge=1)
    max_answer_tokens: int = Field(600, ge=1)
    relevance_min: float = Field(-0.02, ge=-2, le=2)
    repeat_overlap_max: float = Field(0.8, gt=0, le=1)
    boilerplate_patterns: list[str] = []
    pii_min_score: float = Field(0.3, ge=0, le=1)
    near_dup_threshold: float = Field(0.6, gt=0, le=1)
    split_group_cosine: float = Field(0.9, gt=0, le=1)
    prompt_format: Literal["chat_template", "markers"] = "chat_template"
    rejected_source: Literal["base_model", "degraded"] = "base_model"
    rejected_max_tokens: int = Field(128, ge=1)
    dpo_max_pairs: int | None = Field(default=None, ge=1)
    dpo_val_max_pairs: int | None = Field(default=None, ge=1)
    max_rows: int | None = Field(default=None, ge=1)
    executor: Executor = Executor()

    @field_validator("boilerplate_patterns")
    @classmethod
    def _patterns_compile(cls, v):
        for p in v:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"pattern {p!r} is not a valid regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _token_bounds(self):
        if self.min_answer_tokens >= self.max_answer_tokens:
            raise ValueError("min_answer_tokens must be below max_answer_tokens")
        return self


class Lora(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


Precision = Literal["auto", "bf16", "fp16", "fp32"]
Scheduler = Literal["cosine", "linear", "constant", "constant_with_warmup"]


class Train(Section):
    """Settings SFT and DPO share."""

    per_device_batch_size: int = Field(ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(gt=0, lt=1)
    lr_scheduler: Scheduler = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    num_epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1 trains for num_epochs")
    max_seq_length: int = Field(ge=16)
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int = Field(2, ge=1)
    precision: Precision = "auto"
    gradient_checkpointing: bool = False
    overlong: Literal["drop", "truncate", "fail"] = Field("drop", description="examples over max_seq_length")

    @field_validator("max_steps")
    @classmethod
    def _not_zero(cls, v):
        if v == 0:
            raise ValueError("max_steps must be -1 (use num_epochs) or a positive number")
        return v


class SFT(Train):
    load_in_8bit: bool = False
    lora: Lora
    packing: bool = True
    completion_only_loss: bool = True
    neftune_noise_alpha: float | None = Field(None, gt=0, description="NEFTune: noise on the input embeddings")
    eval_steps: int = Field(50, ge=1)
    init_adapter: str | None = None
    launcher: Literal["python", "accelerate"] = "python"
    accelerate_config: str = str(PROJECT / "params" / "accelerate" / "ddp_cpu.yaml")


class Sampling(Section):
    """llama-server's repetition controls, sent with every request (see `generation`)."""

    repeat_penalty: float = Field(1.0, ge=1.0, le=2.0, description="token-level; 1.0 = off")
    repeat_last_n: int = Field(64, ge=0, description="tokens the repeat penalty looks back over")
    dry_multiplier: float = Field(0.0, ge=0, description="DRY sequence-repetition penalty; 0 = off")
    dry_base: float = Field(1.75, ge=1.0)
    dry_allowed_length: int = Field(2, ge=1, description="a repeat longer than this is penalized")


class DPO(Train):
    beta: float = Field(0.1, gt=0)
    sft_weight: float = Field(0.0, ge=0)  # > 0: add the chosen answers' NLL, weighted (RPO), to the DPO loss
    eval_steps: int = Field(50, ge=1)
    rejected: Literal["curated", "policy"] = Field(
        "curated", description="curated: 01's rejected answers; policy: the SFT model's own, made in 03 (on-policy)")
    rejected_sampling: Sampling = Sampling()  # how the policy answers (llama-server fields); default: plain greedy


class Merge(Section):
    logits_atol: float = Field(1e-3, gt=0)
    check_prompts: int = Field(8, ge=1)
    check_tokens: int = Field(48, ge=1, description="greedy tokens compared per prompt")


class Serve(Section):
    backend: Literal["auto", "vllm", "transformers"] = "auto"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_key_env: str = "ALETHEIA_API_KEY"
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int = Field(4096, ge=16)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    startup_timeout_s: float = Field(300, gt=0)
    parallel: int = Field(4, ge=1)  # server slots decoding together (continuous batching)
    load_concurrency: list[PositiveInt] = [1, 4, 8]
    load_requests_per_client: int = Field(2, ge=1)
    load_max_tokens: int = Field(64, ge=1)
    request_timeout_s: float = Field(120, gt=0)


class GGUF(Section):
    outtype: Literal["f16", "bf16"] = "f16"
    quants: list[Literal[QUANT_TYPES]] = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]  # type: ignore[valid-type]
    imatrix_quants: list[Literal[QUANT_TYPES]] = Field(  # type: ignore[valid-type]
        ["Q4_K_M"], description="also quantized with an importance matrix from the SFT training split")
    imatrix_context: int = Field(256, ge=8, description="tokens per llama-imatrix chunk; the text needs 2 chunks")
    imatrix_chunks: int | None = Field(128, ge=2, description="at most this many chunks (None: the whole split)")
    serve_quant: str = "Q4_K_M"
    perplexity_max_texts: int = Field(64, ge=1)
    agreement_tokens: int = Field(32, ge=1)
    max_perplexity_increase: float = Field(0.05, ge=0)

    def ladder(self) -> list[str]:
        """Every level 06 writes, in order: the 16-bit file, `quants`, then `imatrix_quants` as `<level>-imatrix`."""
        return [self.outtype.upper(), *self.quants, *(q + IMATRIX for q in self.imatrix_quants)]

    @model_validator(mode="after")
    def _serve_quant_known(self):
        if self.serve_quant not in self.ladder():
            raise ValueError(f"serve_quant {self.serve_quant!r} is not one of {sorted(self.ladder())}")
        return self


class Generation(Section):
    """How every compared model answers in 08 through llama-server: one sampler setting, one token limit, and either
    one greedy answer per prompt or `samples` answers sampled at `temperature` (seeds run.seed, run.seed + 1, ...)
    whose metrics are averaged per prompt."""

    max_new_tokens: int = Field(320, ge=1, description="covers the references (100-200 words); a cut answer is counted")
    sampling: Sampling = Sampling()
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy")
    samples: int = Field(1, ge=1, le=16, description="answers per prompt; more than 1 needs temperature > 0")

    @model_validator(mode="after")
    def _samples_need_temperature(self):
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0: greedy samples would all be the same answer")
        return self


class Eval(Section):
    tasks: list[str] = []
    skip_tasks: dict[str, str] = Field({}, description="task -> why it is not run (reported under 'not run')")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # of the HF models; auto as in training
    limit: int | None = Field(default=None, ge=1)
    num_prompts: int = Field(50, ge=1)
    max_new_tokens: int = Field(256, ge=1, description="lm-eval's generation tasks (max_gen_toks)")
    generation: Generation = Generation()
    bootstrap_samples: int = Field(1000, ge=10)
    choice_max_words: int = Field(64, ge=1, description="words kept of each answer in the choice tasks")
    tie_margin: float = Field(0.02, ge=0, lt=1, description="score gap below which two answers tie")

    @field_validator("skip_tasks")
    @classmethod
    def _skip_has_reasons(cls, v):
        if blank := [task for task, why in v.items() if not why.strip()]:
            raise ValueError(f"give the reason for skipping {', '.join(blank)}")
        return v


class Config(Section):
    run: Run
    data: Data
    sft: SFT
    dpo: DPO
    merge: Merge = Merge()
    serve: Serve = Serve()
    gguf: GGUF = GGUF()
    eval: Eval = Eval()

    @property
    def runs_dir(self) -> Path:
        return Path(self.run.runs_dir)

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def params_hash(self) -> str:
        """Hash of the resolved settings, ignoring the run's name (same settings, same hash)."""
        d = self.to_dict()
        d["run"].pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        if not isinstance(node.get(k, {}), dict):
            raise ConfigError(f"--set {dotted}: {k} is not a section")
        node = node.setdefault(k, {})
    node[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> dict[str, object]:
    """`["sft.max_steps=5", "run.name=x"]` -> `{"sft.max_steps": 5, "run.name": "x"}` (YAML values)."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. sft.max_steps=5")
        out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return out


_PATH_KEYS = (("run", "runs_dir"), ("data", "raw_glob"), ("sft", "init_adapter"), ("sft", "accelerate_config"))


def _resolve_paths(tree: dict, base: Path) -> None:
    for section, key in _PATH_KEYS:
        value = tree.get(section, {}).get(key) if isinstance(tree.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            tree[section][key] = str((base / value).resolve())
    model = tree.get("run", {}).get("base_model") if isinstance(tree.get("run"), dict) else None
    if isinstance(model, str) and model.startswith(("./", "../")):
        tree["run"]["base_model"] = str((base / model).resolve())


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg += f" (got {e['input']!r})"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path, what: str) -> dict:
    """A YAML file whose top level is a mapping; `ConfigError` names the file (and line) otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def load(path: str | Path, overrides: dict[str, object] | list[str] | None = None) -> Config:
    """Read, override and validate a params file; raise `ConfigError` naming file, key and reason."""
    path = Path(path)
    tree = read_yaml(path, "params file")
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    _resolve_paths(tree, path.parent.resolve())
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(str(path), e)) from None


def save(cfg: Config, path: Path) -> None:
    """Write the resolved settings (absolute paths) so a run folder records what it ran with."""
    files.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
