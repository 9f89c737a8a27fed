"""Answers made the same way for every compared model: transformers in left-padded batches and llama-server slots,
each saying how many tokens it took and whether it ended on its own."""

import pytest

import aletheia_utils as au

LONG = "Explain in detail how virtual memory, paging and the TLB work together in a modern operating system."
PROMPTS = [LONG, "Say hi."]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return au.models.load("embedded:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def server():
    try:
        au.llamacpp.server_binary()
    except au.llamacpp.SetupMissing as e:
        pytest.skip(str(e))
    with au.serve.llama_server(au.models.embedded_gguf("smollm2-135m-instruct"), parallel=2, ctx_size=512) as s:
        yield s


def test_hf_answers_count_a_cut_answer_as_not_ended(model_and_tokenizer):
    model, tok = model_and_tokenizer
    side = tok.padding_side
    cut = au.generation.hf_answers(model, tok, PROMPTS, "chat_template", max_new_tokens=8)
    assert len(cut) == 2 and (cut[0].ended, cut[0].tokens) == (False, 8) and cut[0].text
    full = au.generation.hf_answers(model, tok, PROMPTS, "chat_template", max_new_tokens=48)
    assert any(a.ended for a in full), full
    assert all(a.tokens < 48 if a.ended else a.tokens == 48 for a in full)
    assert "<|im_end|>" not in full[1].text and tok.padding_side == side and not model.training


@pytest.mark.slow
def test_server_answers_count_a_cut_answer_as_not_ended(server):
    [cut] = au.generation.server_answers(server, PROMPTS, max_new_tokens=8, concurrency=2)
    assert (cut[0].ended, cut[0].tokens) == (False, 8) and cut[0].text
    sampling = {"repeat_penalty": 1.1, "repeat_last_n": 64, "dry_multiplier": 0.8}
    [full] = au.generation.server_answers(server, PROMPTS, max_new_tokens=48, sampling=sampling, concurrency=2)
    assert any(a.ended for a in full), full
    assert all(a.tokens < 48 if a.ended else a.tokens == 48 for a in full)
    # the sampler fields reach llama-server as they are: one it refuses fails that request, which gives None
    refused = au.generation.server_answers(server, PROMPTS[1:], max_new_tokens=4, sampling={"repeat_last_n": -1})
    assert refused == [[None]]


def test_server_answers_none_where_a_request_fails():
    gone = au.serve.Server("gone", f"http://127.0.0.1:{au.serve.free_port()}/v1", "k", "m", None, None)
    assert au.generation.server_answers(gone, ["x", "y"], max_new_tokens=4, concurrency=2, timeout=5) == [[None, None]]


@pytest.mark.slow
def test_server_answers_sample_each_prompt_with_one_seed_per_sample(server):
    kw = {"max_new_tokens": 24, "temperature": 1.0, "concurrency": 2}
    runs = au.generation.server_answers(server, PROMPTS, samples=3, seed=7, **kw)
    assert len(runs) == 3 and all(len(run) == 2 and all(run) for run in runs)
    assert len({run[0].text for run in runs}) > 1, "different seeds, different answers"
    again = au.generation.server_answers(server, PROMPTS, samples=1, seed=8, **kw)
    assert again[0][0].text == runs[1][0].text, "sample j is drawn with seed + j: reproducible"
