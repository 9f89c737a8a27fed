"""The gateway's steps called one at a time on a `gateway.Gateway` before fake backends (an httpx.MockTransport):
authentication, rate limit, body validation, backend choice and fail-over. No server, no thread: milliseconds a
test."""

import asyncio
import json
import re
import threading

import httpx
import limits
import pytest
from starlette.requests import Request
from test_gateway import BAD, CONTEXT, KEY, _assert_openai_error
from test_gateway_fakes import CHAT, HOSTILE_JSON

from aletheia_utils import gateway as gw

A, B, C = "http://a.test/v1", "http://b.test/v1", "http://c.test/v1"
ROUTE = "/v1/chat/completions"


def _answer(url: str) -> httpx.Response:
    return httpx.Response(200, json={"model": "alias", "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": f"a secret from {url}"}}]})


def _gateway(answer=_answer, *, backends=(A, B), unhealthy=(), output_filter=None, **cfg):
    """(a Gateway before fake `backends`, the list of backend URLs it POSTs to). Health checks answer 503 for those
    in `unhealthy`, 200 for the others; `answer(url)` answers each POST. The key's limit is 2/minute."""
    calls = []

    def handle(request: httpx.Request) -> httpx.Response:
        url = f"http://{request.url.host}/v1"
        if request.method == "GET":
            return httpx.Response(503 if url in unhealthy else 200)
        calls.append(url)
        return answer(url)
    config = gw.GatewayConfig(model="aletheia", context_tokens=CONTEXT, backends=[{"url": u} for u in backends],
                              **{"max_body_bytes": 1024, **cfg})
    return gw.Gateway(config, {KEY: "2/minute"}, output_filter, transport=httpx.MockTransport(handle)), calls


def _request(body: bytes = b"", headers: dict[str, str] | None = None, piece: int | None = None) -> Request:
    """A POST as the server hands it over: the body (in pieces of `piece` bytes), then nothing (the client stays)."""
    pieces = [body[i:i + piece] for i in range(0, len(body), piece)] if piece else [body]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
    raw_headers = [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    return Request({"type": "http", "method": "POST", "path": ROUTE, "headers": raw_headers}, receive)


def _run(g: gw.Gateway, work):
    """`work(gone)` inside the gateway's lifespan (backends probed first, the client to them closed after)."""
    async def main():
        gone = gw._Disconnect(_request())
        try:
            async with g.lifespan(None):
                return await work(gone)
        finally:
            gone.close()
    return asyncio.run(main())


def _refused(fn, *args) -> gw.ApiError:
    """The `ApiError` that `fn(*args)` raises (run to the end if it is a coroutine), checked for OpenAI's shape."""
    with pytest.raises(gw.ApiError) as caught:
        if asyncio.iscoroutine(result := fn(*args)):
            asyncio.run(result)
    _assert_openai_error(caught.value.body)
    return caught.value


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_read_and_validate_refuses_what_a_backend_should_not_see(route, body, status, param):
    g, _ = _gateway()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    e = _refused(g.read_and_validate, _request(data), f"/v1/{route}")
    assert e.status == status and e.body["error"]["param"] == param, e.body


@pytest.mark.parametrize("body", HOSTILE_JSON, ids=range(len(HOSTILE_JSON)))
def test_read_and_validate_refuses_what_json_cannot_carry(body):
    g, _ = _gateway(max_body_bytes=1 << 20)
    e = _refused(g.read_and_validate, _request(body), ROUTE)
    assert (e.status, e.body["error"]["code"]) == (400, "invalid_json")


def test_read_and_validate_counts_the_body_as_it_arrives():
    g, _ = _gateway()
    assert asyncio.run(g.read_and_validate(_request(json.dumps(CHAT).encode(), piece=7), ROUTE)) == CHAT
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 1024}]}).encode()
    for request in (_request(big, {"content-length": str(len(big))}), _request(big, piece=256)):
        e = _refused(g.read_and_validate, request, ROUTE)
        assert (e.status, e.body["error"]["code"]) == (413, "request_too_large")


def test_authenticate_and_rate_limit():
    g, _ = _gateway()
    for auth, code in [(None, "missing_api_key"), (f"Bearer {KEY}x", "invalid_api_key"),
                       (f"Basic {KEY}", "invalid_api_key"), (KEY, "invalid_api_key")]:
        e = _refused(g.authenticate, _request(headers={"authorization": auth} if auth else {}))
        assert (e.status, e.body["error"]["code"], e.headers) == (401, code, {"WWW-Authenticate": "Bearer"})
    key_id, limit = g.authenticate(_request(headers={"authorization": f"bearer  {KEY}"}))
    assert key_id and str(limit) == "2 per 1 minute"
    g.rate_limit(key_id, limit)
    g.rate_limit(key_id, limit)
    e = _refused(g.rate_limit, key_id, limit)
    assert e.status == 429 and e.body["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(e.headers["Retry-After"]) <= 60
    g.rate_limit("another key", limit)


def test_rate_limit_hits_do_not_start_a_thread_each(monkeypatch):
    """limits' MemoryStorage starts a Timer thread on nearly every hit; the gateway's tidies at most once a second."""
    started = []
    monkeypatch.setattr(threading.Timer, "start", lambda self: started.append(self))
    g, _ = _gateway()
    started.clear()  # the storage's own, at creation
    limit = limits.parse("1000/minute")
    for _ in range(50):
        g.rate_limit("a key", limit)
    assert len(started) == 1, len(started)
    with pytest.raises(gw.ApiError):  # the window still counts every hit
        for _ in range(951):
            g.rate_limit("a key", limit)


def test_pick_backend_skips_the_unhealthy_and_prefers_the_least_busy():
    g, calls = _gateway(backends=(A, B, C), unhealthy=(A,))

    async def work(gone):
        g.pool.backends[1].in_flight = 1  # B is working on a request
        for _ in range(4):  # whatever the round-robin turn
            picked, resp = await g.pick_backend(ROUTE, CHAT, gone)
            assert (picked.url, picked.in_flight) == (C, 1), "busy from the moment the request is sent"
            await g._release(picked, resp)
    _run(g, work)
    assert calls == [C] * 4


def test_complete_fails_over_on_a_5xx_and_takes_the_backend_out():
    g, calls = _gateway(lambda url: httpx.Response(503) if url == A else _answer(url), balance="round_robin")

    async def work(gone):
        return [json.loads((await g.complete(ROUTE, CHAT, gone)).body) for _ in range(2)]
    answers = _run(g, work)
    assert [a["choices"][0]["message"]["content"] for a in answers] == [f"a secret from {B}"] * 2
    assert all(a["model"] == "aletheia" for a in answers), "the backend's alias does not leak"
    assert calls == [A, B, B] and not g.pool.backends[0].healthy
    assert g.metrics.registry.get_sample_value("gateway_upstream_errors_total", {"backend": A}) == 1
    assert [g.metrics.registry.get_sample_value("gateway_backend_in_flight", {"backend": u}) for u in (A, B)] == [0, 0]


def test_no_healthy_backend_is_a_503_with_retry_after():
    g, calls = _gateway(unhealthy=(A, B), cooldown_s=2.5)
    e = _refused(_run, g, lambda gone: g.pick_backend(ROUTE, CHAT, gone))
    assert (e.status, e.body["error"]["code"], e.headers) == (503, "no_healthy_backend", {"Retry-After": "3"})
    assert calls == []


def test_complete_filters_the_output():
    g, _ = _gateway(backends=(A,), output_filter=lambda text: [(m.start(), m.end(), "<X>")
                                                               for m in re.finditer("secret", text)])
    answer = json.loads(_run(g, lambda gone: g.complete(ROUTE, CHAT, gone)).body)
    assert answer["choices"][0]["message"]["content"] == f"a <X> from {A}"
    assert g.metrics.registry.get_sample_value("gateway_redactions_total") == 1


def test_health_and_the_routes():
    """The app's wiring, in process (no lifespan, so no backend has been probed healthy)."""
    g, _ = _gateway()
    assert asyncio.run(g.health()).status_code == 503
    assert _run(g, lambda gone: g.health()).status_code == 200

    async def calls():
        app = gw.create_app(g.cfg, {KEY: "10/minute"}, None, transport=httpx.MockTransport(_answer))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://gw") as client:
            auth = {"Authorization": f"Bearer {KEY}"}
            return [await client.get("/v1/models", headers=auth), await client.get("/metrics"),
                    await client.post("/v1/embeddings", headers=auth, json={}),
                    await client.post(ROUTE, headers=auth, json={**CHAT, "model": "gpt-4o"}),
                    await client.post(ROUTE, headers=auth, json=CHAT), await client.get("/health")]
    models, metrics, unknown, wrong_model, no_backend, health = asyncio.run(calls())
    assert models.json()["data"][0]["id"] == "aletheia"
    assert [r.status_code for r in (metrics, unknown, wrong_model, no_backend, health)] == [401, 404, 404, 503, 503]
    for r in (metrics, unknown, wrong_model, no_backend):
        _assert_openai_error(r.json())
    assert health.json() == {"status": "no healthy backend", "healthy_backends": 0, "backends": 2}


PII_SAMPLES = ["mail jane.doe@example.com now", "call +1 415 555 0199 today", "host 203.0.113.7 is up",
               "v6 2001:db8::8a2e:370:7334 too", "card 4111 1111 1111 1111 ok", "sk-abcdefghijklmnopqrstuvwx123",
               "AKIAIOSFODNN7EXAMPLE", "api_key = 'Zm9vYmFyYmF6cXV4MTIzNDU2'",
               "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY here", "ghp_" + "a1" * 18 + " x"]


def test_may_contain_clears_only_text_without_pii(monkeypatch):
    """The cheap test is a necessary condition: every sample the recognizers find (run without the test) passes it."""
    scrubber = gw.PiiFilter()._scrubber
    ungated = type(scrubber).may_contain
    monkeypatch.setattr(type(scrubber), "may_contain", lambda self, text: True)
    for text in PII_SAMPLES:
        assert scrubber.find(text), f"precondition: the recognizers find something in {text!r}"
        assert ungated(scrubber, text), text
    prose = "A mutex lets one thread at a time enter a critical section, so two threads never race."
    assert not scrubber.find(prose) and not ungated(scrubber, prose)


def test_the_filter_runs_in_a_thread_only_when_text_may_hold_pii(monkeypatch):
    hops = []
    real = asyncio.to_thread
    monkeypatch.setattr(gw.asyncio, "to_thread", lambda fn, *a: hops.append(fn) or real(fn, *a))
    g, _ = _gateway(backends=(A,), output_filter=gw.PiiFilter(), stream_holdback_chars=8)
    redactors = {}
    words = "A mutex lets one thread at a time enter the section; write to jane.doe@example.com for more".split()
    out = ""
    for i, w in enumerate(words):
        final = i == len(words) - 1
        chunk = {"choices": [{"index": 0, "delta": {"content": w + " "}, "finish_reason": "stop" if final else None}]}
        asyncio.run(g.filter_output(chunk, ("delta", "content"), redactors, False))
        out += chunk["choices"][0]["delta"]["content"]
    assert out == "A mutex lets one thread at a time enter the section; write to <EMAIL> for more ", out
    assert 0 < len(hops) <= 4, "prose stays on the event loop; the window holding the address goes to a thread"


def test_where_pii_may_be_the_filter_runs_once_per_every_chars_not_per_chunk():
    pii = gw.PiiFilter()
    text = "Ports 8080 and 8443 answer on 203.0.113.7; mail ops@example.com or call +1 415 555 0199 before 10:30. " * 3
    words = [w + " " for w in text.split()]
    outputs, calls = {}, {}
    for every in (0, 24):
        calls[every] = []
        r = gw.StreamRedactor(lambda t, n=calls[every]: n.append(t) or pii(t), 32, every)
        outputs[every] = "".join(r.feed(w) for w in words) + r.flush()
    assert outputs[0] == outputs[24] == gw.redact(" ".join(text.split()) + " ", pii(" ".join(text.split()) + " "))
    assert "<EMAIL>" in outputs[24] and "<PHONE>" in outputs[24] and "<IP_ADDRESS>" in outputs[24]
    assert len(calls[24]) * 3 <= len(calls[0]), (len(calls[24]), len(calls[0]))
