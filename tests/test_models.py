import os

import pytest
import torch

from aletheia_utils import models


@pytest.fixture(scope="module")
def embedded():
    return models.resolve("embedded:smollm2-135m-instruct")


def test_embedded_gguf_is_found_in_the_installed_wheel():
    path = models.embedded_gguf("smollm2-135m-instruct")
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "site-packages" in str(path)


def test_embedded_checkpoint_is_plain_and_cached(embedded):
    from pathlib import Path

    folder = Path(embedded)
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.resolve("embedded:smollm2-135m-instruct") == embedded
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp, "reused, not rewritten"
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name], "no temporary folder left behind"


def test_embedded_model_loads_and_answers_greedily(embedded):
    model, tok = models.load("embedded:smollm2-135m-instruct")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_a_gguf_shipped_in_chunk_packages_is_joined_once_into_the_cache(monkeypatch, tmp_path):
    import importlib.metadata
    import sys
    import types

    calls = []

    def assemble(out):
        calls.append(out)
        if len(calls) == 1:
            out.write_bytes(b"GGUF half")
            raise ValueError("Assembled file sha256 did not match expected value")
        out.write_bytes(b"GGUF whole")
        return out

    module = types.SimpleNamespace(MODEL_NAME="chunky.gguf", assemble=assemble)
    monkeypatch.setitem(sys.modules, "chunky_gguf", module)
    monkeypatch.setitem(models.EMBEDDED, "chunky", ("chunky-gguf", "chunky"))
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: types.SimpleNamespace(files=[]))
    monkeypatch.setenv("ALETHEIA_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="sha256"):
        models.embedded_gguf("chunky")
    assert not list(tmp_path.rglob("*chunky*")), "a failed join leaves nothing behind"
    path = models.embedded_gguf("chunky")
    assert path == tmp_path / "gguf" / "chunky.gguf" and path.read_bytes() == b"GGUF whole"
    assert models.embedded_gguf("chunky") == path and len(calls) == 2, "joined once, then reused"


def test_unknown_embedded_name():
    with pytest.raises(models.ModelNotFound, match="unknown embedded model 'nope'"):
        models.resolve("embedded:nope")


def test_missing_local_folder(tmp_path):
    with pytest.raises(models.ModelNotFound, match="does not exist"):
        models.resolve(str(tmp_path / "absent"))
    with pytest.raises(models.ModelNotFound, match="holds no config.json"):
        models.resolve(str(tmp_path))


@pytest.mark.parametrize("offline", ["1", "0"])
def test_hub_id_without_network_is_one_sentence(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(models.ModelNotFound) as err:
        models.resolve("deepseek-ai/deepseek-coder-6.7b-instruct")
    msg = str(err.value)
    assert "\n" not in msg and "not in the local Hugging Face cache" in msg
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert os.environ["HF_HUB_OFFLINE"] == offline
