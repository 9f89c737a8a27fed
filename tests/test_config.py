from pathlib import Path

import pytest
import yaml

from aletheia_utils import config

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params"


@pytest.mark.parametrize("name", sorted(p.name for p in PARAMS.glob("*.yaml") if p.name != "gateway.yaml"))
def test_shipped_params_files_validate(name):
    cfg = config.load(PARAMS / name)
    assert Path(cfg.run.runs_dir) == (ROOT / "runs").resolve()
    assert Path(cfg.data.raw_glob).parent == (ROOT / "data" / "raw").resolve()


def test_default_uses_the_embedded_model():
    assert config.load(PARAMS / "default.yaml").run.base_model == "embedded:smollm2-135m-instruct"


def test_the_gemma_file_is_the_default_recipe_on_a_pretrained_base():
    default, gemma = (config.load(PARAMS / n).model_dump() for n in ("default.yaml", "gemma3-270m.yaml"))
    assert gemma["run"]["base_model"] == "embedded:gemma3-270m" and gemma["data"]["prompt_format"] == "markers"
    for tree in (default, gemma):
        del tree["run"]["name"], tree["run"]["base_model"], tree["data"]["prompt_format"]
    assert gemma == default


def test_production_file_holds_the_seed_settings():
    cfg = config.load(PARAMS / "deepseek-coder-7b.yaml")
    assert cfg.run.base_model == "deepseek-ai/deepseek-coder-6.7b-instruct"
    s = cfg.sft
    assert (s.load_in_8bit, s.lora.r, s.lora.alpha, s.lora.dropout) == (True, 16, 32, 0.05)
    assert s.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (s.max_seq_length, s.packing) == (4096, True)
    assert (s.per_device_batch_size, s.gradient_accumulation_steps) == (2, 16)
    assert (s.learning_rate, s.lr_scheduler, s.num_epochs, s.max_steps, s.weight_decay) == (2e-4, "cosine", 2, -1, 0.0)
    d = cfg.dpo
    assert (d.beta, d.learning_rate, d.num_epochs, d.max_steps) == (0.1, 1e-5, 1, -1)
    assert (d.per_device_batch_size, d.gradient_accumulation_steps) == (2, 16)
    assert cfg.serve.backend == "vllm"
    assert cfg.eval.tasks == ["hellaswag", "truthfulqa_mc2", "winogrande", "gsm8k", "mbpp"]
    assert cfg.eval.skip_tasks == {}, "HumanEval runs for a code model"


def _write(tmp_path, mutate):
    tree = yaml.safe_load((PARAMS / "smoke.yaml").read_text())
    mutate(tree)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.mark.parametrize("mutate, expected", [
    (lambda t: t["sft"].update(learning_rat=1e-4), "sft.learning_rat: unknown key"),
    (lambda t: t.update(trainer={}), "trainer: unknown key"),
    (lambda t: t["sft"]["lora"].update(r="sixteen"), "sft.lora.r: Input should be a valid integer"),
    (lambda t: t["sft"].update(packing="maybe"), "sft.packing: Input should be a valid boolean"),
    (lambda t: t["sft"]["lora"].update(r=0), "sft.lora.r: Input should be greater than or equal to 1 (got 0)"),
    (lambda t: t["sft"].update(learning_rate=-1.0), "sft.learning_rate: Input should be greater than 0"),
    (lambda t: t["data"].update(split={"train": 0.8, "validation": 0.1, "eval": 0.2}),
     "data.split: train + validation + eval must be 1.0, got 1.1"),
    (lambda t: t["gguf"].update(quants=["Q4_K_M", "Q9_Z"]), "gguf.quants.1: Input should be"),
    (lambda t: t["gguf"].update(serve_quant="Q6_K"), "gguf: serve_quant 'Q6_K' is not one of"),
    (lambda t: t["gguf"].update(imatrix_quants=["Q4_K_X"]), "gguf.imatrix_quants.0: Input should be"),
    (lambda t: t["gguf"].update(imatrix_quants=["Q5_K_M"], serve_quant="Q4_K_M-imatrix"),
     "gguf: serve_quant 'Q4_K_M-imatrix' is not one of"),
    (lambda t: t["sft"].update(max_steps=0), "sft.max_steps: max_steps must be -1"),
    (lambda t: t["run"].pop("base_model"), "run.base_model: required key is missing"),
    (lambda t: t["serve"].update(port=70000), "serve.port: Input should be less than or equal to 65535"),
    (lambda t: t["data"].update(executor={"kind": "spark"}), "data.executor.kind: Input should be 'local', 'ray'"),
    (lambda t: t["data"].update(executor={"tasks": 0}), "data.executor.tasks: Input should be greater than or equal"),
    (lambda t: t["data"].update(executor={"kind": "slurm"}), "data.executor: kind: slurm needs slurm_partition"),
    (lambda t: t["eval"].update(skip_tasks={"aletheia_humaneval": " "}),
     "eval.skip_tasks: give the reason for skipping aletheia_humaneval"),
    (lambda t: t["eval"].update(generation={"samples": 4}),
     "eval.generation: samples > 1 needs temperature > 0"),
])
def test_bad_params_name_file_key_and_reason(tmp_path, mutate, expected):
    path = _write(tmp_path, mutate)
    with pytest.raises(config.ConfigError) as err:
        config.load(path)
    assert str(err.value).startswith(f"{path}: {expected}"), str(err.value)


def test_every_problem_is_one_line(tmp_path):
    path = _write(tmp_path, lambda t: (t["sft"].update(packing="maybe"), t["dpo"].update(beta=-1)))
    lines = str(pytest.raises(config.ConfigError, config.load, path).value).splitlines()
    assert len(lines) == 2 and all(line.startswith(str(path)) for line in lines)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("run:\n  name: x\n  base_model: [unclosed\n")
    with pytest.raises(config.ConfigError, match=rf"^{path}:\d+: not valid YAML"):
        config.load(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(config.ConfigError, match="params file not found"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(config.ConfigError, match="top level must be a mapping"):
        config.load(tmp_path / "list.yaml")


def test_overrides_are_typed_and_validated():
    cfg = config.load(PARAMS / "smoke.yaml", ["sft.max_steps=5", "sft.learning_rate=1e-3", "run.name=x"])
    assert (cfg.sft.max_steps, cfg.sft.learning_rate, cfg.run.name) == (5, 1e-3, "x")
    with pytest.raises(config.ConfigError, match=r"sft.max_stepz: unknown key"):
        config.load(PARAMS / "smoke.yaml", ["sft.max_stepz=5"])
    with pytest.raises(config.ConfigError, match=r"--set sft: expected KEY=VALUE"):
        config.parse_overrides(["sft"])


def test_saved_params_reload_identically_and_hash_ignores_the_name(tmp_path):
    cfg = config.load(PARAMS / "smoke.yaml")
    config.save(cfg, tmp_path / "params.yaml")
    again = config.load(tmp_path / "params.yaml")
    assert again == cfg
    renamed = config.load(PARAMS / "smoke.yaml", ["run.name=other"])
    assert renamed.params_hash() == cfg.params_hash()
    assert config.load(PARAMS / "smoke.yaml", ["sft.max_steps=7"]).params_hash() != cfg.params_hash()


def test_paths_left_out_default_to_the_project_not_the_working_directory(tmp_path):
    path = _write(tmp_path, lambda t: (t["run"].pop("runs_dir"), t["data"].pop("raw_glob")))
    cfg = config.load(path)
    assert cfg.run.runs_dir == str(ROOT / "runs") and cfg.data.raw_glob == str(ROOT / "data" / "raw" / "*.jsonl")
    assert cfg.sft.accelerate_config == str(ROOT / "params" / "accelerate" / "ddp_cpu.yaml")
