"""The gateway in this process (uvicorn in a thread) before fake backends (an httpx.MockTransport, or a tiny ASGI app
for a real TCP upstream): hostile input, balancing, fail-over, backend errors. No llama-server; seconds in all."""

import asyncio
import contextlib
import gc
import http.client
import json
import threading
import time

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_gateway import CONTEXT, KEY, _assert_openai_error, _metric

import aletheia_utils as au
from aletheia_utils import gateway as gw

FAKE_A, FAKE_B, ALIAS = "http://backend-a.test/v1", "http://backend-b.test/v1", "model-Q4_K_M"
CHAT = {"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def _answer(body: dict, text: str = "Hello there, this is a fake backend answering.") -> httpx.Response:
    """What a llama-server answers to `body`: a completion or an SSE stream, both naming the backend's alias."""
    chat = "messages" in body
    if not body.get("stream"):
        choice = {"index": 0, "finish_reason": "stop",
                  **({"message": {"role": "assistant", "content": text}} if chat else {"text": text})}
        return httpx.Response(200, json={"id": "x", "object": "chat.completion", "model": body["model"],
                                         "choices": [choice], "usage": {"prompt_tokens": 3, "completion_tokens": 5}})
    words = [w + " " for w in text.split()]
    chunks = [{"id": "x", "model": body["model"], "choices": [
        {"index": 0, "finish_reason": None, **({"delta": {"content": w}} if chat else {"text": w})}]} for w in words]
    chunks.append({"id": "x", "model": body["model"], "choices": [
        {"index": 0, "finish_reason": "stop", **({"delta": {}} if chat else {"text": ""})}]})
    return _sse([json.dumps(c) for c in chunks] + ["[DONE]"])


def _sse(payloads, status=200) -> httpx.Response:
    return httpx.Response(status, headers={"content-type": "text/event-stream"},
                          content="".join(f"data: {p}\n\n" for p in payloads).encode())


class _Broken(httpx.AsyncByteStream):
    """A response body that fails with `error` after `head` bytes."""

    def __init__(self, error: Exception, head: bytes = b""):
        self.error, self.head = error, head

    async def __aiter__(self):
        if self.head:
            yield self.head
        raise self.error


def _serve_in_thread(app, name: str):
    """Start uvicorn on a free loopback port in a daemon thread named `name`; returns (base URL, stop())."""
    port = au.serve.free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                                           lifespan="on" if hasattr(app, "router") else "off"))
    thread = threading.Thread(target=server.run, name=name, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(10)
    return f"http://127.0.0.1:{port}", stop


@contextlib.contextmanager
def _fake_gateway(answer=None, *, backends=(FAKE_A, FAKE_B), output_filter=None, transport=None, **cfg):
    """The gateway app in this process (uvicorn thread "gateway-loop") before fake backends. `answer(url, body)`
    (sync or async) answers each POST, `url` being the backend's base URL; health checks get 200. Yields an
    httpx.Client on the gateway (key set) with `.calls`, the (backend URL, body) of every POST in order."""
    calls = []

    async def handle(request: httpx.Request) -> httpx.Response:
        base = str(request.url).split("/v1")[0] + "/v1"
        if request.method == "GET":
            return httpx.Response(200, json={"status": "ok"})
        body = json.loads(request.content)
        calls.append((base, body))
        got = (answer or (lambda url, b: _answer(b)))(base, body)
        return await got if asyncio.iscoroutine(got) else got
    config = gw.GatewayConfig(model="aletheia", context_tokens=CONTEXT, rate_limit="100000/minute",
                              backends=[{"url": u, "model": ALIAS} for u in backends], **cfg)
    app = gw.create_app(config, {KEY: config.rate_limit}, output_filter,
                        transport=transport or httpx.MockTransport(handle))
    url, stop = _serve_in_thread(app, "gateway-loop")
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as client:
            client.calls = calls
            yield client
    finally:
        stop()


def _events(resp: httpx.Response) -> list:
    return [line[5:].strip() for line in resp.text.splitlines() if line.startswith("data:")]


HOSTILE_JSON = [  # json.loads accepts all of these; none can be sent on as JSON
    b'{"model": "aletheia", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 1}',
    b'{"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    b'{"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
    b'{"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "temperature": 1e999}',
    b'{"model": "aletheia", "messages": [{"role": "user", "content": "hi"}], "x": ' + b"[" * 50000 + b"]" * 50000
    + b"}",
]


def test_hostile_json_gets_400_and_the_connection_stays_usable():
    with _fake_gateway() as client:
        conn = http.client.HTTPConnection(client.base_url.host, client.base_url.port, timeout=10)
        headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        sock = None
        for body in HOSTILE_JSON:
            conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
            assert resp.status == 400, (body[:120], resp.status, raw[:200])
            _assert_openai_error(json.loads(raw), code="invalid_json")
            sock = sock or conn.sock
            assert conn.sock is sock, "the gateway closed the connection"
        conn.request("POST", "/v1/chat/completions", body=json.dumps(CHAT), headers=headers)
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["choices"] and conn.sock is sock
        assert client.calls == [(FAKE_A, {**CHAT, "model": ALIAS})], "only the good request reached a backend"
        conn.close()


@pytest.fixture(scope="module")
def fake_gateway():
    with _fake_gateway() as client:
        yield client


_scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
            | st.sampled_from(["\ud800", "a\udfffb", "aletheia", "user", "assistant", "text"]))
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["role", "content", "type", "text", "tool_calls", "include_usage", "x"]) | st.text(max_size=8),
    inner, max_size=4), max_leaves=12)
_fields = st.sampled_from(["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "stream",
                           "stream_options", "temperature", "top_p", "n", "stop", "logit_bias", "x"])
_raw_values = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e400", '"\\ud800"', '"\\udc00x"',
                               "1" * 5000, "[" * 3000 + "]" * 3000, '{"a": ' * 3000 + "1" + "}" * 3000])


@st.composite
def _bodies(draw) -> bytes:
    """Mostly a valid request with some fields replaced, removed or added (as JSON or as raw text JSON parsers
    accept but JSON forbids); sometimes any JSON value or any bytes."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "raw", "json", "bytes"]))
    base = dict(draw(st.sampled_from([CHAT, {"model": "aletheia", "prompt": "hi", "max_tokens": 4}])))
    if kind == "edit":
        for name in draw(st.lists(_fields, max_size=3)):
            if draw(st.booleans()):
                base[name] = draw(_json)
            else:
                base.pop(name, None)
        if draw(st.booleans()):
            base["stream"] = True
        return json.dumps(base).encode()
    if kind == "raw":
        text = json.dumps({**base, draw(_fields): "@RAW@"})
        return text.replace('"@RAW@"', draw(_raw_values)).encode()
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    return draw(st.binary(max_size=64))


_header_value = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=24)
_headers = st.fixed_dictionaries(
    {"authorization": st.sampled_from([f"Bearer {KEY}", f"bearer   {KEY}", f"Bearer {KEY} x", "Bearer", "Basic x"])
                      | _header_value.filter(bool).map(lambda v: "Bearer " + v)},
    optional={"content-type": st.sampled_from(["application/json", "text/plain", "application/json; charset=latin1",
                                               "multipart/form-data; boundary=x"]) | _header_value,
              "accept": _header_value, "accept-encoding": st.sampled_from(["gzip", "identity", "br", "*"]),
              "x-request-id": _header_value, "openai-beta": _header_value, "user-agent": _header_value})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=_bodies(), headers=_headers)
def test_fuzz_request_path_never_a_gateway_5xx(fake_gateway, route, body, headers):
    """Whatever a client sends: no 5xx (the fake backends never fail, so any 5xx would be the gateway's own), and
    every error in OpenAI's shape."""
    resp = fake_gateway.post(route, content=body, headers=headers)
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code != 200:
        _assert_openai_error(resp.json())
    elif resp.headers["content-type"].startswith("text/event-stream"):
        events = _events(resp)
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), events
    else:
        assert resp.json()["choices"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_least_busy_counts_a_request_from_when_it_is_sent(stream):
    """llama-server sends a non-streamed answer's headers only when it is done: a backend working on a long
    request must count as busy before then, so the short requests all go to the idle one."""
    release = threading.Event()

    async def answer(url, body):
        if body["messages"][0]["content"] == "long":
            while not release.is_set():  # the headers come when generation ends
                await asyncio.sleep(0.01)
        return _answer(body)
    with _fake_gateway(answer, balance="least_busy") as client:
        long = threading.Thread(target=client.post, args=("/v1/chat/completions",),
                                kwargs={"json": {**CHAT, "stream": stream, "messages": [
                                    {"role": "user", "content": "long"}]}})
        long.start()
        deadline = time.monotonic() + 10
        while not client.calls:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = client.calls[0][0]
        for _ in range(6):
            assert client.post("/v1/chat/completions", json={**CHAT, "stream": stream}).status_code == 200
        release.set()
        long.join(10)
        assert [url for url, _ in client.calls[1:]] == [FAKE_B if busy == FAKE_A else FAKE_A] * 6
        metrics = _metrics(client)
        assert [_metric(metrics, "gateway_backend_in_flight", backend=u) for u in (FAKE_A, FAKE_B)] == [0, 0]


def _metrics(client) -> str:
    return client.get("/metrics").text


@pytest.mark.parametrize("failure", [httpx.ConnectError, httpx.ConnectTimeout])
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_connect_failures_fail_over_and_mark_the_backend_unhealthy(failure, stream):
    def answer(url, body):
        if url == FAKE_A:
            raise failure("connecting failed")
        return _answer(body)
    with _fake_gateway(answer, balance="round_robin") as client:
        for _ in range(2):
            resp = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
            assert resp.status_code == 200, resp.text
        assert [url for url, _ in client.calls] == [FAKE_A, FAKE_B, FAKE_B], "A is out after its first failure"
        metrics = _metrics(client)
        assert _metric(metrics, "gateway_backend_healthy", backend=FAKE_A) == 0
        assert _metric(metrics, "gateway_upstream_errors_total", backend=FAKE_A) == 1


@pytest.mark.parametrize("phase", ["headers", "body", "first event"])
def test_a_read_timeout_does_not_fail_over(phase):
    """The request reached the backend (it may be generating): sending it again elsewhere doubles the load."""
    def answer(url, body):
        if phase == "headers":
            raise httpx.ReadTimeout("no answer")
        kind = "text/event-stream" if body.get("stream") else "application/json"
        return httpx.Response(200, headers={"content-type": kind},
                              stream=_Broken(httpx.ReadTimeout("no more bytes"), b'{"id": '))
    with _fake_gateway(answer, balance="round_robin") as client:
        resp = client.post("/v1/chat/completions", json={**CHAT, "stream": phase == "first event"})
        assert resp.status_code == 504, resp.text
        _assert_openai_error(resp.json(), code="backend_timeout")
        assert [url for url, _ in client.calls] == [FAKE_A]
        assert _metric(_metrics(client), "gateway_backend_healthy", backend=FAKE_A) == 1


@pytest.mark.parametrize("status", [400, 503])
def test_an_error_body_that_breaks_off_fails_over(status):
    def answer(url, body):
        if url == FAKE_A:
            return httpx.Response(status, headers={"content-type": "application/json"},
                                  stream=_Broken(httpx.ReadError("connection reset"), b'{"error": '))
        return _answer(body)
    with _fake_gateway(answer, balance="round_robin") as client:
        resp = client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 200, resp.text
        assert [url for url, _ in client.calls] == [FAKE_A, FAKE_B]
        assert _metric(_metrics(client), "gateway_backend_healthy", backend=FAKE_A) == 0


CONTEXT_ERRORS = {  # what the backends answer to a prompt longer than their context
    "llama-server": {"error": {"code": 400, "message": "request (4476 tokens) exceeds the available context size "
                               "(4096 tokens), try increasing it", "type": "exceed_context_size_error",
                               "n_prompt_tokens": 4476, "n_ctx": 4096}},
    "vllm": {"error": {"message": "This model's maximum context length is 2048 tokens. However, you requested 2100 "
                       "tokens (2092 in the messages, 8 in the completion). Please reduce the length of the "
                       "messages or completion.", "type": "BadRequestError", "param": None, "code": 400}},
    "vllm-old": {"object": "error", "message": "'max_tokens' or 'max_completion_tokens' is too large: 8. This model's "
                 "maximum context length is 2048 tokens and your request has 2045 input tokens (8 > 2048 - 2045).",
                 "type": "BadRequestError", "param": None, "code": 400},
    "vllm-prompt": {"error": {"message": "The decoder prompt (length 2100) is longer than the maximum model length "
                              "of 2048. Make sure that `max_model_len` is no smaller than the number of text tokens.",
                              "type": "BadRequestError", "param": None, "code": 400}},
}


@pytest.mark.parametrize("backend", sorted(CONTEXT_ERRORS))
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_context_overflow_is_context_length_exceeded(backend, route):
    with _fake_gateway(lambda url, body: httpx.Response(400, json=CONTEXT_ERRORS[backend])) as client:
        body = CHAT if route == "/v1/chat/completions" else {"model": "aletheia", "prompt": "hi", "max_tokens": 8}
        for stream in (False, True):
            resp = client.post(route, json={**body, "stream": stream})
            assert resp.status_code == 400, resp.text
            _assert_openai_error(resp.json(), code="context_length_exceeded",
                                 param="messages" if "chat" in route else "prompt")
            assert resp.json()["error"]["type"] == "invalid_request_error"
        other = httpx.Response(400, json={"error": {"message": "grammar is invalid", "type": "invalid_request_error"}})
    with _fake_gateway(lambda url, body: other) as client:
        _assert_openai_error(client.post(route, json=body).json(), code="backend_error")  # other 400s as before


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_the_backends_model_name_does_not_leak(stream, route):
    with _fake_gateway() as client:
        body = CHAT if route == "/v1/chat/completions" else {"model": "aletheia", "prompt": "hi", "max_tokens": 8}
        resp = client.post(route, json={**body, "stream": stream})
        assert resp.status_code == 200 and client.calls[0][1]["model"] == ALIAS
        assert ALIAS not in resp.text
        answers = [json.loads(e) for e in _events(resp)[:-1]] if stream else [resp.json()]
        assert answers and all(a["model"] == "aletheia" for a in answers)


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
def test_the_output_filter_runs_off_the_event_loop(stream):
    """Presidio takes milliseconds per call: on the event loop it would stall every other connection."""
    threads = []

    def find(text):
        threads.append(threading.current_thread().name)
        return []
    with _fake_gateway(output_filter=find, stream_holdback_chars=4) as client:
        resp = client.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert resp.status_code == 200
    assert threads and "gateway-loop" not in threads, threads


@pytest.mark.parametrize("bad", ["not json", "42", '{"choices": '])
def test_a_non_json_event_from_the_backend_becomes_an_error_event(bad):
    good = json.dumps({"id": "x", "model": ALIAS, "choices": [{"index": 0, "delta": {"content": "Hi"}}]})
    with _fake_gateway(lambda url, body: _sse([good, bad, good, "[DONE]"])) as client:
        resp = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        events = _events(resp)
        assert resp.status_code == 200 and json.loads(events[0])["choices"][0]["delta"]["content"] == "Hi"
        assert len(events) == 2, events  # nothing after the error
        _assert_openai_error(json.loads(events[1]))
        assert "not a JSON object" in json.loads(events[1])["error"]["message"]


@pytest.mark.parametrize("bad", [b"not json", b"42", b"[]"])
def test_a_non_json_answer_is_a_502(bad):
    with _fake_gateway(lambda url, body: httpx.Response(200, content=bad)) as client:
        resp = client.post("/v1/chat/completions", json=CHAT)
        assert resp.status_code == 502
        _assert_openai_error(resp.json(), code="backend_error")


async def _endless_backend(scope, receive, send):
    """A real (TCP) backend: healthy, and every POST streams one chunk every 20 ms until the client leaves."""
    if scope["path"].endswith("/health"):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        return await send({"type": "http.response.body", "body": b"{}"})
    await receive()  # the request body
    gone = asyncio.ensure_future(receive())  # then http.disconnect, when the gateway lets go
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    chunk = json.dumps({"id": "x", "model": ALIAS, "choices": [{"index": 0, "delta": {"content": "tick "}}]})
    while not gone.done():
        await send({"type": "http.response.body", "body": f"data: {chunk}\n\n".encode(), "more_body": True})
        await asyncio.sleep(0.02)


def test_a_client_disconnect_leaves_no_task_exception(caplog):
    backend, stop_backend = _serve_in_thread(_endless_backend, "fake-backend")
    try:
        with _fake_gateway(backends=(backend + "/v1",), transport=httpx.AsyncHTTPTransport()) as client:
            for _ in range(3):
                with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as resp:
                    next(resp.iter_lines())
            time.sleep(0.5)
            gc.collect()
            time.sleep(0.1)
            assert client.get("/health").status_code == 200
            metrics = _metrics(client)
            assert _metric(metrics, "gateway_cancelled_total") == 3
            assert _metric(metrics, "gateway_backend_in_flight") == 0, "the backend is released"
    finally:
        stop_backend()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()], caplog.text
