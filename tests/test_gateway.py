"""The gateway as a real process on loopback in front of real llama.cpp servers, driven by the openai client."""

import json
import os
import random
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

import aletheia_utils as au
from aletheia_utils import cli
from aletheia_utils import gateway as gw

pytestmark = pytest.mark.slow  # starts llama.cpp or model servers: not in `make test-fast`

KEY, BURST_KEY, BACKEND_KEY = "gw-test-key", "gw-burst-key", "backend-key"
CONTEXT, MAX_BODY = 256, 65536
ECHO_PROMPT = "Contact: jane.doe@example.com\nContact: jane.doe@example.com\nContact:"


@pytest.fixture(scope="module")
def gguf():
    return au.models.embedded_gguf("smollm2-135m-instruct")


def _config(backends, **kw) -> gw.GatewayConfig:
    return gw.GatewayConfig(port=au.serve.free_port(), model="aletheia", context_tokens=CONTEXT, health_interval_s=1,
                            cooldown_s=2, request_timeout_s=60, backends=backends, **kw)


@pytest.fixture(scope="module")
def backend(gguf):
    with au.serve.llama_server(gguf, api_key=BACKEND_KEY, parallel=2, ctx_size=512, threads=1) as s:
        yield s


@pytest.fixture(scope="module")
def gateway(backend, tmp_path_factory, monkeypatch_module):
    keys_file = tmp_path_factory.mktemp("gw") / "keys.txt"
    keys_file.write_text(f"# key [limit]\n{BURST_KEY} 3/minute\n")
    monkeypatch_module.setenv("GW_TEST_BACKEND_KEY", BACKEND_KEY)
    cfg = _config([{"url": backend.base_url, "model": backend.model, "api_key_env": "GW_TEST_BACKEND_KEY"}],
                  keys_file=str(keys_file), rate_limit="1000/minute", max_body_bytes=MAX_BODY)
    with gw.launch(cfg, [KEY]) as g:
        yield g
    assert g.process.poll() is not None, "the gateway outlived its context manager"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _http(url, *, key=None, data=None, headers=None, method=None):
    """(status, headers, parsed JSON or text) without raising on 4xx/5xx."""
    h = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}), **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, hdrs, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode()


def _root(server):
    return server.base_url.removesuffix("/v1")


def _metric(text: str, name: str, **labels) -> float:
    sel = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + sel + '}') if sel else ''} ([0-9.e+-]+)$"
    return sum(float(m) for m in re.findall(pattern, text, re.M))


def _gateway_metrics(g) -> str:
    return _http(_root(g) + "/metrics", key=g.api_key)[2]


def _assert_openai_error(body, code=None, param=None):
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    assert code is None or body["error"]["code"] == code, body
    assert param is None or body["error"]["param"] == param, body


def test_openai_client_through_gateway(gateway):
    api = au.serve.client(gateway)
    assert [m.id for m in api.models.list()] == ["aletheia"]
    reply = api.chat.completions.create(model="aletheia", messages=[{"role": "user", "content": "Say hello."}],
                                        max_tokens=8, temperature=0)
    assert reply.choices[0].message.content.strip() and reply.usage.completion_tokens <= 8
    chunks = list(api.chat.completions.create(model="aletheia", messages=[{"role": "user", "content": "Say hello."}],
                                              max_tokens=8, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert all(c.usage is None for c in chunks), "usage the client did not ask for is not passed on"
    text = api.completions.create(model="aletheia", prompt="The capital of France is", max_tokens=4).choices[0].text
    assert text
    metrics = _gateway_metrics(gateway)
    assert _metric(metrics, "gateway_requests_total", route="/v1/chat/completions", status="200") >= 2
    assert _metric(metrics, "gateway_tokens_total", direction="out") >= reply.usage.completion_tokens
    assert _metric(metrics, "gateway_time_to_first_token_seconds_count") >= 1


def test_auth(gateway):
    url, body = gateway.base_url + "/chat/completions", json.dumps(
        {"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    status, headers, err = _http(url, data=body)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    _assert_openai_error(err, code="missing_api_key")
    for auth in (f"Bearer {KEY}x", "Bearer wrong", f"Basic {KEY}", f"{KEY}"):
        status, _, err = _http(url, data=body, headers={"Authorization": auth})
        assert status == 401, auth
        _assert_openai_error(err, code="invalid_api_key")
    assert _http(url, data=body, headers={"Authorization": f"bearer {KEY}"})[0] == 200  # scheme is case-insensitive
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway.base_url, api_key="wrong", max_retries=0).models.list()
    assert _http(_root(gateway) + "/metrics")[0] == 401
    for key in (None, "wrong", KEY):  # health never asks for a key, and a key sent there changes nothing
        status, _, health = _http(_root(gateway) + "/health", key=key)
        assert status == 200 and health["healthy_backends"] == 1


def test_rate_limit_burst(gateway):
    api = openai.OpenAI(base_url=gateway.base_url, api_key=BURST_KEY, max_retries=0)
    for _ in range(3):
        api.chat.completions.create(model="aletheia", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(openai.RateLimitError) as caught:
        api.chat.completions.create(model="aletheia", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 60
    _assert_openai_error(caught.value.response.json(), code="rate_limit_exceeded")
    au.serve.client(gateway).models.list()  # another key is not limited


VALID = {"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
BAD = [  # (route, body, status, param)
    ("chat/completions", b"{not json", 400, None),
    ("chat/completions", b"[1, 2]", 400, None),
    ("chat/completions", {**VALID, "model": "gpt-4o"}, 404, "model"),
    ("chat/completions", {k: v for k, v in VALID.items() if k != "model"}, 400, "model"),
    ("chat/completions", {**VALID, "max_tokens": 0}, 400, "max_tokens"),
    ("chat/completions", {**VALID, "max_tokens": CONTEXT + 1}, 400, "max_tokens"),
    ("chat/completions", {**VALID, "max_tokens": "8"}, 400, "max_tokens"),
    ("chat/completions", {**VALID, "max_tokens": True}, 400, "max_tokens"),
    ("chat/completions", {**VALID, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("chat/completions", {**VALID, "messages": []}, 400, "messages"),
    ("chat/completions", {**VALID, "messages": "hi"}, 400, "messages"),
    ("chat/completions", {**VALID, "messages": ["hi"]}, 400, "messages[0]"),
    ("chat/completions", {**VALID, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat/completions", {**VALID, "messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("chat/completions", {**VALID, "messages": [{"role": "user", "content": 42}]}, 400, "messages[0].content"),
    ("chat/completions", {**VALID, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
     "messages[0].content"),
    ("chat/completions", {**VALID, "stream": "yes"}, 400, "stream"),
    ("completions", {"model": "aletheia", "prompt": 42, "max_tokens": 1}, 400, "prompt"),
]


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_validation_before_backend(gateway, backend, route, body, status, param):
    before = _http(_root(backend) + "/metrics", key=BACKEND_KEY)[2]
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    got, _, err = _http(f"{gateway.base_url}/{route}", key=KEY, data=data)
    assert got == status, err
    _assert_openai_error(err, param=param)
    after = _http(_root(backend) + "/metrics", key=BACKEND_KEY)[2]
    assert _metric(after, "llamacpp:prompt_tokens_total") == _metric(before, "llamacpp:prompt_tokens_total")


def test_body_too_large(gateway):
    big = json.dumps({**VALID, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode()
    status, _, err = _http(gateway.base_url + "/chat/completions", key=KEY, data=big)
    assert status == 413
    _assert_openai_error(err, code="request_too_large")
    chunked = iter([big[i:i + 8192] for i in range(0, len(big), 8192)])
    status, _, err = _http(gateway.base_url + "/chat/completions", key=KEY, data=chunked,
                           headers={"Transfer-Encoding": "chunked"})
    assert status == 413  # a body without Content-Length is counted as it arrives


def test_unknown_route_has_openai_shape(gateway):
    status, _, err = _http(gateway.base_url + "/embeddings", key=KEY, data=b"{}")
    assert status == 404
    _assert_openai_error(err)


def test_streamed_output_filtered(gateway, backend):
    direct = au.serve.client(backend).completions.create(model=backend.model, prompt=ECHO_PROMPT, max_tokens=12,
                                                         temperature=0)
    assert "jane.doe@example.com" in direct.choices[0].text, "precondition: the model repeats the address"
    api = au.serve.client(gateway)
    streamed = "".join(c.choices[0].text for c in api.completions.create(
        model="aletheia", prompt=ECHO_PROMPT, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert "jane.doe" not in streamed and "<EMAIL>" in streamed
    whole = api.completions.create(model="aletheia", prompt=ECHO_PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text == streamed
    assert _metric(_gateway_metrics(gateway), "gateway_redactions_total") >= 2


def test_stream_redactor_matches_whole_text():
    find = gw.PiiFilter()
    text = ("Mail jane.doe@example.com or call +1 415 555 0199; the key sk-abcdefghijklmnopqrstuvwx123 and "
            "api_key = 'Zm9vYmFyYmF6cXV4MTIzNDU2' are secrets, 127.0.0.1 is not. Card 4111 1111 1111 1111 ends.")
    expected = gw.redact(text, find(text))
    assert "<EMAIL>" in expected and "<PHONE>" in expected and "<API_KEY>" in expected and "127.0.0.1" in expected
    rng = random.Random(0)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        for every in (0, 24):  # searched on every chunk, or once per 24 new characters where PII may be
            for f in (find, lambda t: find(t)):  # with and without the cheap may_contain test
                r = gw.StreamRedactor(f, 32, every)
                assert "".join(r.feed(p) for p in pieces) + r.flush() == expected, (every, f)


def test_client_disconnect_cancels_upstream(gateway, backend):
    body = json.dumps({"model": "aletheia", "max_tokens": CONTEXT, "stream": True, "ignore_eos": True,
                       "messages": [{"role": "user", "content": "Count from 1 to 200, one number per line."}]})
    req = urllib.request.Request(gateway.base_url + "/chat/completions", data=body.encode(),
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})

    def backend_metric(name):
        return _metric(_http(_root(backend) + "/metrics", key=BACKEND_KEY)[2], name)
    decodes = backend_metric("llamacpp:n_decode_total")
    with urllib.request.urlopen(req, timeout=60) as r:
        r.readline()
        assert backend_metric("llamacpp:requests_processing") == 1
    deadline = time.monotonic() + 10
    while backend_metric("llamacpp:requests_processing"):
        assert time.monotonic() < deadline, "the backend kept generating after the client left"
        time.sleep(0.1)
    assert backend_metric("llamacpp:n_decode_total") - decodes < CONTEXT / 2, "generation ran on to max_tokens"
    assert _metric(_gateway_metrics(gateway), "gateway_cancelled_total") == 1


def test_failover_when_a_backend_dies(gguf):
    with au.serve.llama_server(gguf, parallel=2, ctx_size=512, threads=1) as a, \
            au.serve.llama_server(gguf, parallel=2, ctx_size=512, threads=1) as b:
        cfg = _config([{"url": a.base_url, "model": a.model}, {"url": b.base_url, "model": b.model}],
                      rate_limit="1000/minute", balance="round_robin")
        with gw.launch(cfg, [KEY]) as g:
            result = {}
            run = threading.Thread(target=lambda: result.update(au.serve.load_test(
                g, ["What is a mutex?", "What is DNS?"], concurrency=4, requests=16, max_tokens=24, timeout=30)))
            run.start()
            time.sleep(1.0)
            os.killpg(b.process.pid, signal.SIGKILL)
            run.join(90)
            assert not run.is_alive(), "the load run hung after a backend died"
            # streams already flowing from the dead backend may fail (no retry after bytes); nothing else does
            assert result["ok"] >= 16 - 2 and all("mid-stream" in e for e in result["errors"]), result["errors"]
            metrics = _gateway_metrics(g)
            assert _metric(metrics, "gateway_backend_healthy", backend=b.base_url) == 0
            assert _metric(metrics, "gateway_backend_healthy", backend=a.base_url) == 1
            after = au.serve.load_test(g, ["What is DNS?"], concurrency=2, requests=4, max_tokens=4, timeout=30)
            assert after["error_rate"] == 0
            os.killpg(a.process.pid, signal.SIGKILL)
            with pytest.raises(openai.APIStatusError) as caught:
                au.serve.client(g).chat.completions.create(model="aletheia", max_tokens=2,
                                                           messages=[{"role": "user", "content": "hi"}])
            assert caught.value.status_code == 503 and caught.value.response.headers["Retry-After"]
            _assert_openai_error(caught.value.response.json(), code="no_healthy_backend")
            assert _http(_root(g) + "/health")[0] == 503


def test_example_config_and_errors_naming_file_and_key(tmp_path, monkeypatch):
    example = gw.load_config(Path(__file__).resolve().parent.parent / "params" / "gateway.yaml")
    assert len(example.backends) == 2 and example.output_filter == "pii"
    bad = tmp_path / "gw.yaml"
    bad.write_text("model: aletheia\nrate_limit: lots\nbackends: [{url: 'http://127.0.0.1:1/v1'}]\nportt: 1\n")
    with pytest.raises(gw.GatewayError) as caught:
        gw.load_config(bad)
    assert f"{bad}: rate_limit:" in str(caught.value) and f"{bad}: portt: unknown key" in str(caught.value)
    good = tmp_path / "ok.yaml"
    good.write_text("model: aletheia\nkeys_env: GW_TEST_NO_KEYS\nbackends: [{url: 'http://127.0.0.1:1/v1'}]\n")
    monkeypatch.delenv("GW_TEST_NO_KEYS", raising=False)
    assert cli.main(["gateway", "--config", str(good)]) == 2  # no keys: fails closed, before listening
    (tmp_path / "keys").write_text("k1 lots\n")
    with pytest.raises(gw.GatewayError, match=r"keys:1: rate limit 'lots'"):
        gw.load_keys(gw.load_config(good).model_copy(update={"keys_file": str(tmp_path / "keys")}))
