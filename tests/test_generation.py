"""Answers made the same way for every compared model: transformers in left-padded batches and llama-server slots,
each saying how many tokens it took and whether it ended on its own."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

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


class _Recorder(BaseHTTPRequestHandler):
    """An OpenAI-compatible server that keeps each request's path and body and answers " An answer. " (2 tokens)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, body))
        chat = "messages" in body
        text = " An answer. "
        choice = {"index": 0, "finish_reason": "stop",
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        out = json.dumps({"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                          "model": body["model"], "choices": [choice],
                          "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def recorder():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    httpd.requests = []
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield au.serve.Server("fake", f"http://127.0.0.1:{httpd.server_port}/v1", "k", "m", None, None), httpd.requests
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.parametrize("style", ["chat_template", "markers"])
def test_server_answers_ask_in_the_prompt_format(recorder, style):
    """The chat endpoint for the chat template (the server applies it); the completion endpoint with the markers text
    for `markers`, which a chat endpoint would wrap in the chat template instead."""
    server, requests = recorder
    requests.clear()
    [[answer]] = au.generation.server_answers(server, ["What is a TLB?"], max_new_tokens=4, seed=3, style=style,
                                              sampling={"repeat_penalty": 1.1})
    assert answer == au.generation.Answer("An answer.", 2, True)
    [(path, body)] = requests
    if style == "markers":
        assert path == "/v1/completions" and "messages" not in body
        assert body["prompt"] == "### Instruction:\nWhat is a TLB?\n\n### Response:\n"
    else:
        assert path == "/v1/chat/completions" and "prompt" not in body
        assert body["messages"] == [{"role": "user", "content": "What is a TLB?"}]
    assert (body["max_tokens"], body["seed"], body["temperature"], body["repeat_penalty"]) == (4, 3, 0.0, 1.1)


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
