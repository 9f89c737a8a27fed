"""GGUF conversion and quantization with llama.cpp's own tools, the per-level checks, and bad inputs; serving an HF
folder as an F16 GGUF."""

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import aletheia_utils as au
from aletheia_utils.gguf import GGUFError

ROWS = [{"prompt": "What does fsync do?",
         "response": "fsync asks the kernel to flush a file's dirty pages and metadata to stable storage."},
        {"prompt": "Why use a mutex?", "response": "A mutex lets one thread at a time enter a critical section."}]


@pytest.fixture(scope="module")
def hf_dir():
    return Path(au.models.resolve("embedded:smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def f16(hf_dir, tmp_path_factory):
    return au.gguf.convert(hf_dir, tmp_path_factory.mktemp("gguf") / "model-F16.gguf", "f16")


@pytest.mark.slow
def test_conversion_keeps_template_eos_and_matches_hf(hf_dir, f16):
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    meta = au.gguf.read_metadata(f16)
    assert meta["architecture"] == "llama" and 15.9 < meta["bpw"] < 16.1
    check = au.gguf.check_metadata(meta, tokenizer)
    assert check["chat_template_ok"] and check["eos_ok"] and not check["problems"], check
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    probes = au.gguf.probes(model, tokenizer, ROWS, "chat_template", greedy_tokens=12)
    hf = au.gguf.measure_hf(model, probes)
    gguf = au.gguf.measure_gguf(f16, probes)
    assert hf["scored_tokens"] == gguf["scored_tokens"] > 20
    assert abs(gguf["perplexity"] / hf["perplexity"] - 1) < 0.01, (gguf, hf)
    assert gguf["greedy_agreement"] > 0.9


@pytest.mark.slow
def test_quantize_makes_a_smaller_file_and_leaves_no_partial(f16):
    out = au.gguf.quantize(f16, f16.with_name("model-Q8_0.gguf"), "Q8_0")
    meta = au.gguf.read_metadata(out)
    assert 8 < meta["bpw"] < 9.5 and meta["size_bytes"] < f16.stat().st_size * 0.6
    assert sorted(p.name for p in f16.parent.iterdir()) == ["model-F16.gguf", "model-Q8_0.gguf"]


@pytest.mark.slow
def test_an_importance_matrix_from_calibration_text_weights_the_quantizer(hf_dir, f16, tmp_path):
    text = tmp_path / "calibration.txt"
    text.write_text(au.gguf.calibration_text(ROWS * 8, "chat_template", AutoTokenizer.from_pretrained(hf_dir)))
    assert text.read_text().count("<|im_start|>assistant") == 16
    imatrix = au.gguf.importance_matrix(f16, text, tmp_path / "imatrix.gguf", context=64, chunks=3)
    assert au.gguf.imatrix_info(imatrix) == {"datasets": [str(text)], "chunks": 3, "chunk_size": 64}
    plain = au.gguf.quantize(f16, tmp_path / "model-Q4_K_M.gguf", "Q4_K_M")
    weighted = au.gguf.quantize(f16, tmp_path / "model-Q4_K_M-imatrix.gguf", "Q4_K_M", imatrix=imatrix)
    meta_plain, meta_weighted = au.gguf.read_metadata(plain), au.gguf.read_metadata(weighted)
    assert meta_plain["imatrix"] is None and meta_weighted["imatrix"] == str(imatrix)
    assert meta_plain["bpw"] == meta_weighted["bpw"], "the same level: the same bits, spent elsewhere"
    assert plain.read_bytes()[-1_000_000:] != weighted.read_bytes()[-1_000_000:], "the weights differ"
    # a text shorter than two chunks is refused by llama-imatrix: a clear error, nothing written
    with pytest.raises(GGUFError, match=r"llama-imatrix on .* failed: .*too-short.gguf was not written"):
        au.gguf.importance_matrix(f16, text, tmp_path / "too-short.gguf", context=4096)
    assert not list(tmp_path.glob("*too-short*"))


@pytest.mark.slow
def test_bad_model_folder(tmp_path, hf_dir):
    with pytest.raises(GGUFError, match="config.json missing"):
        au.gguf.convert(tmp_path / "missing", tmp_path / "x.gguf")
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(hf_dir / "config.json", folder)
    with pytest.raises(GGUFError, match="no \\*.safetensors"):
        au.gguf.convert(folder, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*")), "no file, hidden temporaries included"


@pytest.mark.slow
def test_corrupt_weights_fail_conversion_without_output(tmp_path, hf_dir):
    folder = tmp_path / "corrupt"
    shutil.copytree(hf_dir, folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:4096])
    with pytest.raises(GGUFError, match=r"convert_hf_to_gguf.py on .* failed"):
        au.gguf.convert(folder, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*x.gguf*"))


@pytest.mark.slow
def test_unknown_quant_and_truncated_input(tmp_path, f16):
    with pytest.raises(GGUFError, match="unknown quant type 'Q3_X' \\(known: Q8_0, "):
        au.gguf.quantize(f16, tmp_path / "q.gguf", "Q3_X")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(f16.read_bytes()[:5_000_000])
    with pytest.raises(GGUFError, match="truncated"):
        au.gguf.quantize(truncated, tmp_path / "q.gguf", "Q4_K_M")
    with pytest.raises(GGUFError, match="no such GGUF"):
        au.gguf.read_metadata(tmp_path / "absent.gguf")
    assert not list(tmp_path.glob("*q.gguf*"))


@pytest.mark.slow
def test_metadata_is_parsed_once_per_file_and_a_file_cut_in_place_is_read_again(tmp_path, f16, monkeypatch):
    parsed = []
    parse = au.gguf._parse_metadata
    monkeypatch.setattr(au.gguf, "_parse_metadata", lambda path, size: parsed.append(path) or parse(path, size))
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(f16, copy)
    first = au.gguf.read_metadata(copy)
    moved = copy.rename(tmp_path / "moved.gguf")  # as atomic_write puts a file in place
    again = au.gguf.read_metadata(moved)
    assert len(parsed) == 1 and again["path"] == moved and {**again, "path": copy} == first
    with moved.open("r+b") as fh:  # the same inode, cut short
        fh.truncate(5_000_000)
    with pytest.raises(GGUFError, match="truncated"):
        au.gguf.read_metadata(moved)
    assert len(parsed) == 2


@pytest.fixture
def tiny_disk(tmp_path):
    """A 24 MiB tmpfs: a disk that really fills up (ENOSPC). Needs root and mount; skipped otherwise."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.slow
def test_a_full_disk_names_the_file_leaves_nothing_and_the_next_run_redoes_it(hf_dir, f16, tiny_disk):
    out = tiny_disk / "model-Q8_0.gguf"
    with pytest.raises(GGUFError) as caught:
        au.gguf.quantize(f16, out, "Q8_0")
    message = str(caught.value)
    # llama.cpp's own reason follows only when its log reaches stderr (a test that loaded a quiet Llama silences it)
    assert str(out) in message and "the disk is full" in message, message
    with pytest.raises(GGUFError) as caught:
        au.gguf.convert(hf_dir, tiny_disk / "model-F16.gguf")
    message = str(caught.value)
    assert str(tiny_disk / "model-F16.gguf") in message and "the disk is full" in message, message
    assert list(tiny_disk.iterdir()) == [], "no file that looks complete, and no temporary"
    subprocess.run(["mount", "-o", "remount,size=200m", "tmpfs", str(tiny_disk)], check=True)  # space freed
    assert au.gguf.read_metadata(au.gguf.quantize(f16, out, "Q8_0"))["n_tensors"] > 0
    assert [p.name for p in tiny_disk.iterdir()] == [out.name]


def test_served_f16_serves_the_converted_file_and_removes_it(tmp_path, monkeypatch):
    seen = {}

    def convert(model_dir, out):
        seen["model_dir"] = model_dir
        out.write_bytes(b"GGUF")
        return out

    @contextlib.contextmanager
    def llama_server(gguf, **options):
        seen["gguf"], seen["options"] = gguf, options
        assert gguf.is_file()
        yield "server"

    monkeypatch.setattr(au.gguf, "convert", convert)
    monkeypatch.setattr(au.gguf, "llama_server", llama_server)
    with au.gguf.served_f16("hf", name="sft", workdir=tmp_path, parallel=3, ctx_size=512, threads=1) as server:
        assert server == "server"
    assert seen["model_dir"] == "hf" and seen["gguf"].name == "sft-F16.gguf" and seen["gguf"].parent.parent == tmp_path
    assert seen["options"] == {"parallel": 3, "ctx_size": 512, "threads": 1}
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="body failed"), au.gguf.served_f16("hf", workdir=tmp_path):
        raise RuntimeError("body failed")
    assert list(tmp_path.iterdir()) == [], "removed also when the body raises"


def test_a_model_trained_on_markers_is_saved_with_them_as_its_chat_template(tmp_path, hf_dir):
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer.chat_template = None  # as a pretrained base's tokenizer (Gemma 3 270M's GGUF carries none)
    tiny = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    saved = AutoTokenizer.from_pretrained(au.merge.save_model(tiny, tokenizer, tmp_path / "merged"))
    question = [{"role": "user", "content": ROWS[0]["prompt"]}]
    assert saved.apply_chat_template(question, tokenize=False, add_generation_prompt=True) == \
        au.data.format_prompt(ROWS[0]["prompt"], "markers")
    answered = question + [{"role": "assistant", "content": ROWS[0]["response"]}]
    assert saved.apply_chat_template(answered, tokenize=False) == \
        au.data.format_example(ROWS[0]["prompt"], ROWS[0]["response"], "markers", saved)
    as_trained = saved(au.data.format_example(ROWS[0]["prompt"], ROWS[0]["response"], "markers", saved)).input_ids
    assert saved.apply_chat_template(answered, return_dict=True)["input_ids"] == as_trained, "the same token ids"
    kept = AutoTokenizer.from_pretrained(au.merge.save_model(tiny, AutoTokenizer.from_pretrained(hf_dir),
                                                             tmp_path / "chat"))
    assert kept.chat_template == AutoTokenizer.from_pretrained(hf_dir).chat_template, "a chat template is kept"
