"""The OpenAI-compatible gateway in front of one or more model servers (05_serve_vllm).

A small FastAPI app: bearer keys (constant-time compare), a moving-window rate limit per key (`limits`),
request validation before anything reaches a backend, an output filter that redacts secrets and personal
data (also in streamed output), least-busy or round-robin balancing with health checks and fail-over,
Prometheus metrics, and cancellation of the upstream request when the client goes away. Every error has
OpenAI's shape `{"error": {"message", "type", "param", "code"}}`, so the `openai` client raises its own
exception classes. Started by `aletheia gateway --config FILE` or, from Python, by `launch(...)`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import importlib
import itertools
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
import limits
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException

from . import config as config_mod
from . import files, pii, serve

ROUTES = ("/v1/chat/completions", "/v1/completions")
ROLES = {"system", "developer", "user", "assistant", "tool"}
CONTEXT_OVERFLOW = re.compile(r"maximum context length|longer than the maximum model length|exceeds the available "
                              r"context size", re.IGNORECASE)  # vLLM's and llama-server's messages
Span = tuple[int, int, str]  # start, end, replacement


class GatewayError(ValueError):
    """A gateway that cannot start: bad config file, no keys."""


# ---------------------------------------------------------------- config

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Backend(_Strict):
    url: str = Field(pattern=r"^https?://.+/v1$", description="base URL ending in /v1")
    model: str | None = Field(None, description="the name this backend knows the model by (default: the public one)")
    api_key_env: str | None = Field(None, description="environment variable holding this backend's key")
    health_path: str = "/health"


class GatewayConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    model: str = Field(min_length=1, description="the model name clients ask for")
    context_tokens: int = Field(2048, ge=1, description="upper bound of max_tokens")
    keys_env: str | None = "ALETHEIA_GATEWAY_KEYS"
    keys_file: str | None = None
    rate_limit: str = "60/minute"
    max_body_bytes: int = Field(1 << 20, ge=256)
    balance: Literal["least_busy", "round_robin"] = "least_busy"
    health_interval_s: float = Field(5, gt=0)
    cooldown_s: float = Field(10, gt=0, description="how long a failed backend stays out before it is probed")
    connect_timeout_s: float = Field(5, gt=0)
    request_timeout_s: float = Field(300, gt=0)
    output_filter: str = Field("pii", description="pii, none, or module:factory returning text -> spans")
    stream_holdback_chars: int = Field(32, ge=0, description="streamed text held back so a split secret is caught")
    stream_filter_every_chars: int = Field(24, ge=0, description="where text may hold PII, search it once per this "
                                                                 "many new characters, not once per chunk")
    backends: list[Backend] = Field(min_length=1)

    @field_validator("rate_limit")
    @classmethod
    def _limit_parses(cls, v):
        try:
            limits.parse(v)
        except ValueError:
            raise ValueError(f"{v!r} is not a rate limit such as '60/minute' or '5 per second'") from None
        return v


def load_config(path: str | os.PathLike) -> GatewayConfig:
    """Read and validate a gateway YAML file; errors name the file, the key and the reason."""
    path = Path(path)
    try:
        return GatewayConfig.model_validate(config_mod.read_yaml(path, "gateway config"))
    except config_mod.ConfigError as e:
        raise GatewayError(str(e)) from None
    except ValidationError as e:
        raise GatewayError(config_mod._format_errors(str(path), e)) from None


def load_keys(cfg: GatewayConfig) -> dict[str, str]:
    """Key -> its rate limit. Keys come from `keys_env` (comma-separated, the default limit) and `keys_file`
    (one `KEY [LIMIT]` per line, # comments); at least one, or the gateway fails closed."""
    keys = {k.strip(): cfg.rate_limit for k in os.environ.get(cfg.keys_env or "", "").split(",") if k.strip()}
    if cfg.keys_file:
        try:
            lines = Path(cfg.keys_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise GatewayError(f"{cfg.keys_file}: cannot read the keys file ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            key, _, limit = line.strip().partition(" ")
            if not key or key.startswith("#"):
                continue
            keys[key] = limit.strip() or cfg.rate_limit
            try:
                limits.parse(keys[key])
            except ValueError:
                raise GatewayError(f"{cfg.keys_file}:{n}: rate limit {keys[key]!r} is not like '60/minute'") from None
    if not keys:
        raise GatewayError(f"no API keys: set {cfg.keys_env} (comma-separated) or keys_file; the gateway fails closed")
    return keys


# ---------------------------------------------------------------- output filter

class PiiFilter:
    """The default filter: the curation scrubber's recognizers (e-mail, phone, IP, card, API keys) → placeholders."""

    def __init__(self):
        self._scrubber, self._names = pii.PiiScrubber(), pii.PII_PLACEHOLDERS

    def __call__(self, text: str) -> list[Span]:
        return [(r.start, r.end, self._names.get(r.entity_type, "<REDACTED>")) for r in self._scrubber.find(text)]

    def may_contain(self, text: str) -> bool:
        """False only when `text` holds nothing to redact (a regex search, cheap enough for the event loop)."""
        return self._scrubber.may_contain(text)


def make_filter(spec: str) -> Callable[[str], list[Span]] | None:
    """`pii` (default), `none`, or `package.module:factory` whose result maps text to (start, end, replacement)."""
    if spec == "none":
        return None
    if spec == "pii":
        return PiiFilter()
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)()
    except (ImportError, AttributeError, ValueError) as e:
        raise GatewayError(f"output_filter {spec!r}: {e}") from None


def redact(text: str, spans: Sequence[Span]) -> str:
    """Apply non-overlapping spans (earliest first, the longer one on a tie)."""
    out, pos = [], 0
    for start, end, replacement in sorted(spans, key=lambda s: (s[0], -s[1])):
        if start >= pos:
            out += [text[pos:start], replacement]
            pos = end
    return "".join(out) + text[pos:]


class StreamRedactor:
    """Redacts text that arrives in pieces. It holds back the last `holdback` characters (cut at whitespace, never
    inside a match) and searches with the last `holdback` characters already sent as left context, so a secret split
    across chunks, or one recognized by what precedes it (`api_key = ...`), is still caught. A filter with a
    `may_contain(text)` test (the default `PiiFilter`) is not called on a window that test clears; where it may hold
    something (or the filter has no such test), text is searched once `every` new characters have come beyond the
    holdback, not once per chunk."""

    def __init__(self, find: Callable[[str], list[Span]], holdback: int = 32, every: int = 0):
        self.find, self.holdback, self.every, self.sent, self.buffer = find, holdback, every, "", ""
        self.may_contain, self.redactions = getattr(find, "may_contain", None), 0

    def _clear(self, window: str) -> bool:
        return self.may_contain is not None and not self.may_contain(window)

    def cheap(self, text: str, final: bool = False) -> bool:
        """Whether `feed(text)` (and `flush()` if `final`) runs no filter call: the text stays held back, or the
        filter's `may_contain` clears the window. Then it can run on the event loop; otherwise in a thread."""
        if not final and len(self.buffer) + len(text) - self.holdback < max(self.every, 1):
            return True
        return self._clear(self.sent + self.buffer + text)

    def _spans(self) -> list[Span]:
        offset, window = len(self.sent), self.sent + self.buffer
        if self._clear(window):
            return []
        return [(max(s - offset, 0), e - offset, r) for s, e, r in self.find(window) if e > offset]

    def feed(self, text: str) -> str:
        self.buffer += text
        cut = len(self.buffer) - self.holdback
        if cut <= 0 or (cut < self.every and not self._clear(self.sent + self.buffer)):
            return ""
        space = max(self.buffer.rfind(" ", 0, cut), self.buffer.rfind("\n", 0, cut))
        cut = space + 1 if space >= 0 else cut
        spans = self._spans()
        for start, end, _ in sorted(spans, reverse=True):
            if start < cut < end:
                cut = start
        return self._emit(cut, [s for s in spans if s[1] <= cut])

    def flush(self) -> str:
        return self._emit(len(self.buffer), self._spans()) if self.buffer else ""

    def _emit(self, cut: int, spans: list[Span]) -> str:
        head, self.buffer = self.buffer[:cut], self.buffer[cut:]
        self.sent = (self.sent + head)[-self.holdback:]
        self.redactions += len(spans)
        return redact(head, spans)


# ---------------------------------------------------------------- rate limits

class _Storage(MemoryStorage):
    """`limits`' in-memory storage, tidying expired entries at most once a second. The stock one starts a new
    `threading.Timer` thread on nearly every hit (about a millisecond of the gateway's time per request, measured);
    the moving window's answer never depends on that tidying, only its memory does."""

    _tidied = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:  # the private hook `incr`/`acquire_entry` call on each hit
        if (now := time.monotonic()) - self._tidied >= 1.0:
            self._tidied = now
            super()._MemoryStorage__schedule_expiry()


# ---------------------------------------------------------------- errors and validation

class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a number")
    return value


def parse_body(raw: bytes):
    """The request body as JSON, or `ApiError` 400: besides malformed JSON this refuses what Python's parser
    accepts but JSON (and so a backend) does not: NaN/Infinity, numbers that overflow to infinity, strings with a
    lone surrogate (`"\\ud800"`), nesting deeper than the parser's recursion limit."""
    try:
        body = json.loads(raw, parse_constant=_no_constant, parse_float=_finite)
    except RecursionError:
        raise ApiError(400, "the request body nests too deeply", code="invalid_json") from None
    except ValueError as e:  # also UnicodeDecodeError
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    encode_body(body)
    return body


def encode_body(body) -> bytes:
    """`body` as JSON for a backend; what cannot be encoded came from the client, so it is a 400."""
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "the request body is not valid JSON: a string holds a lone surrogate (\\ud800-\\udfff)",
                       code="invalid_json") from None
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body cannot be sent on as JSON: {e}", code="invalid_json") from None


def backend_error(status: int, raw: bytes, route: str) -> ApiError:
    """A backend's non-200 answer in OpenAI's shape. A prompt longer than the context (llama-server's
    `exceed_context_size_error`, vLLM's "maximum context length" / "maximum model length") is a 400
    `context_length_exceeded` as OpenAI has it; any other answer keeps its status, with code `backend_error`."""
    try:
        data = json.loads(raw)
        err = data.get("error", data)  # older vLLM: the error object is the whole body
        message, kind = (str(err["message"]), err.get("type")) if isinstance(err, dict) else (str(err), None)
    except (ValueError, KeyError, TypeError, AttributeError):
        message, kind = raw.decode(errors="replace")[:500] or f"backend answered {status}", None
    if status < 500 and (kind == "exceed_context_size_error" or CONTEXT_OVERFLOW.search(message)):
        return ApiError(400, message, param="messages" if route == "/v1/chat/completions" else "prompt",
                        code="context_length_exceeded")
    return ApiError(status, message, type_="invalid_request_error" if status < 500 else "server_error",
                    code="backend_error")


def _content_ok(content) -> bool:
    if isinstance(content, str):
        return True
    return isinstance(content, list) and bool(content) and all(
        isinstance(p, dict) and isinstance(p.get("type"), str)
        and (p["type"] != "text" or isinstance(p.get("text"), str)) for p in content)


def validate(body, route: str, cfg: GatewayConfig) -> None:
    """Raise `ApiError` (400/404) for a request a backend should never see."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    if not isinstance(body.get("model"), str):
        raise ApiError(400, "'model' is required and must be a string", param="model",
                       code="missing_required_parameter")
    if body["model"] != cfg.model:
        raise ApiError(404, f"The model '{body['model']}' does not exist; this gateway serves '{cfg.model}'",
                       param="model", code="model_not_found")
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None and (type(value) is not int or not 1 <= value <= cfg.context_tokens):
            raise ApiError(400, f"'{name}' must be an integer in [1, {cfg.context_tokens}], got {value!r}",
                           param=name, code="invalid_value")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise ApiError(400, "'stream' must be true or false", param="stream", code="invalid_type")
    if route == "/v1/completions":
        prompt = body.get("prompt")
        strings = isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt)
        if not (isinstance(prompt, str) or strings):
            raise ApiError(400, "'prompt' must be a string or a non-empty list of strings", param="prompt")
        return
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {sorted(ROLES)}, got {m.get('role')!r}",
                           param=f"messages[{i}].role")
        tool_call = m["role"] == "assistant" and m.get("tool_calls") and m.get("content") is None
        if not tool_call and not _content_ok(m.get("content")):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of content parts",
                           param=f"messages[{i}].content")


# ---------------------------------------------------------------- backends

@dataclass
class Upstream:
    url: str
    model: str
    key: str | None
    health_url: str
    healthy: bool = False
    retry_at: float = 0.0
    in_flight: int = 0


class Pool:
    """Backends with health state: a failed one is out for `cooldown_s`, then probed again."""

    def __init__(self, cfg: GatewayConfig, on_health: Callable[[Upstream], None]):
        self.cfg, self.on_health, self._turn = cfg, on_health, itertools.count()
        self.backends = [Upstream(b.url, b.model or cfg.model, os.environ.get(b.api_key_env) if b.api_key_env else None,
                                  b.url.removesuffix("/v1") + b.health_path) for b in cfg.backends]

    def pick(self, exclude: set[str]) -> Upstream | None:
        live = [b for b in self.backends if b.healthy and b.url not in exclude]
        if not live:
            return None
        turn = next(self._turn)
        live = live[turn % len(live):] + live[:turn % len(live)]
        return min(live, key=lambda b: b.in_flight) if self.cfg.balance == "least_busy" else live[0]

    def mark(self, b: Upstream, healthy: bool) -> None:
        b.healthy, b.retry_at = healthy, 0.0 if healthy else time.monotonic() + self.cfg.cooldown_s
        self.on_health(b)

    async def probe(self, http) -> None:
        async def one(b: Upstream):
            if not b.healthy and time.monotonic() < b.retry_at:
                return
            headers = {"Authorization": f"Bearer {b.key}"} if b.key else {}
            try:
                answer = await http.get(b.health_url, headers=headers, timeout=self.cfg.connect_timeout_s)
                ok = answer.status_code == 200
            except Exception:  # any failure to answer is unhealthy
                ok = False
            self.mark(b, ok)
        await asyncio.gather(*(one(b) for b in self.backends))


# ---------------------------------------------------------------- metrics

class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gateway_requests", "Requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("gateway_request_latency_seconds", "Time to the last byte", ["route"], registry=r,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160))
        self.ttft = Histogram("gateway_time_to_first_token_seconds", "Time to the first streamed token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40))
        self.tokens = Counter("gateway_tokens", "Tokens by direction (from backend usage)", ["direction"], registry=r)
        self.healthy = Gauge("gateway_backend_healthy", "1 if the backend passes health checks", ["backend"],
                             registry=r)
        self.in_flight = Gauge("gateway_backend_in_flight", "Requests open on the backend", ["backend"], registry=r)
        self.redactions = Counter("gateway_redactions", "Spans the output filter replaced", registry=r)
        self.upstream_errors = Counter("gateway_upstream_errors", "Backend failures", ["backend"], registry=r)
        self.cancelled = Counter("gateway_cancelled", "Upstream requests cancelled because the client left", registry=r)

    def usage(self, usage: dict | None) -> None:
        if isinstance(usage, dict):
            self.tokens.labels("in").inc(usage.get("prompt_tokens") or 0)
            self.tokens.labels("out").inc(usage.get("completion_tokens") or 0)


class _Observe:
    """ASGI middleware: every response counted by route and status, latency to its last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in (*ROUTES, "/v1/models", "/health", "/metrics") else "other"
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


# ---------------------------------------------------------------- the app

class ClientGone(Exception):
    """The client disconnected before the answer was complete."""


class _Disconnect:
    """Watches the client's connection; `run(aw)` awaits `aw` unless the client leaves first (then cancels it)."""

    def __init__(self, request):
        self.watch = asyncio.ensure_future(self._wait(request))

    @staticmethod
    async def _wait(request):
        while (await request.receive())["type"] != "http.disconnect":
            pass

    async def run(self, awaitable):
        work = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({work, self.watch}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled (the server dropped the response): `work` must not outlive the upstream
            work.cancel()     # connection it reads, or its ReadError is logged as "never retrieved"
            work.add_done_callback(_retrieve)
            raise
        if work.done():
            return work.result()
        work.cancel()
        with contextlib.suppress(BaseException):
            await work
        raise ClientGone

    def close(self):
        self.watch.cancel()


class _Stream(StreamingResponse):
    """A streamed answer whose `cleanup` runs however it ends: a generator the server drops before its first chunk
    (the client left at once) never runs its own `finally`."""

    def __init__(self, content, cleanup: Callable[[], Awaitable[None]], **kw):
        super().__init__(content, **kw)
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.cleanup()


def _retrieve(task: asyncio.Future) -> None:
    if not task.cancelled():
        task.exception()


def _json_object(raw: str | bytes) -> dict | None:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _error_event(message: str, code: str | None = None) -> str:
    return f"data: {json.dumps(ApiError(502, message, 'server_error', code=code).body)}\n\n"


def _hash(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _text_field(route: str, stream: bool) -> tuple[str, str | None]:
    if route == "/v1/completions":
        return "text", None
    return ("delta", "content") if stream else ("message", "content")


def _get_text(choice: dict, field: tuple[str, str | None]):
    outer, inner = field
    return (choice.get(outer) or {}).get(inner) if inner else choice.get(outer)


def _set_text(choice: dict, field: tuple[str, str | None], text: str) -> None:
    outer, inner = field
    if inner:
        choice.setdefault(outer, {})[inner] = text
    else:
        choice[outer] = text


def _held_back(chunk: dict, field: tuple[str, str | None]) -> bool:
    """A chunk that only carried text the filter is still holding: nothing to send."""
    outer, inner = field
    return bool(chunk.get("choices")) and not chunk.get("usage") and all(
        _get_text(c, field) == "" and not c.get("finish_reason")
        and (not inner or set(c.get(outer) or {}) <= {inner}) for c in chunk["choices"])


def _timed_out(b: Upstream) -> ApiError:
    return ApiError(504, f"backend {b.url} did not answer in time", type_="server_error", code="backend_timeout")


async def _data_lines(resp: httpx.Response) -> AsyncIterator[str]:
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            yield line[5:].strip()


async def _api_error(request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body, status_code=e.status, headers=e.headers)


async def _http_error(request, e: HTTPException) -> JSONResponse:
    return await _api_error(request, ApiError(e.status_code, str(e.detail),
                                              code="not_found" if e.status_code == 404 else None))


class Gateway:
    """The gateway's state (keys, limiter, backend pool, metrics, the HTTP client to the backends) and its request
    path one step a method: `proxy` authenticates, rate-limits, reads and validates the body, then `complete`s or
    `stream`s through the backend `pick_backend` finds. `create_app` wires the methods to routes. Requests go to
    the backends through the transport (`transport`, else httpx's pooled one) without `httpx.AsyncClient`'s
    per-request layers (header and cookie merging, auth and redirect flows: a quarter of the hop's CPU time, measured);
    the client serves the health checks on the same pool."""

    def __init__(self, cfg: GatewayConfig, keys: dict[str, str], output_filter: Callable[[str], list[Span]] | None,
                 *, transport: httpx.AsyncBaseTransport | None = None):
        self.cfg, self.output_filter, self.metrics = cfg, output_filter, Metrics()
        self.pool = Pool(cfg, lambda b: self.metrics.healthy.labels(b.url).set(int(b.healthy)))
        self.accepted = [(_hash(k), limits.parse(limit)) for k, limit in keys.items()]
        self.limiter = MovingWindowRateLimiter(_Storage())
        self.timeout = {"timeout": httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s).as_dict()}
        self.transport = transport or httpx.AsyncHTTPTransport(
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout_s, connect=cfg.connect_timeout_s),
                                      transport=self.transport)  # closing it closes the transport

    @contextlib.asynccontextmanager
    async def lifespan(self, app):
        """Probe the backends, keep probing every `health_interval_s`; close the client to the backends at exit."""
        async def health_loop():
            while True:
                await asyncio.sleep(self.cfg.health_interval_s)
                await self.pool.probe(self.http)
        await self.pool.probe(self.http)
        task = asyncio.create_task(health_loop())
        yield
        task.cancel()
        await self.http.aclose()

    def authenticate(self, request: Request) -> tuple[str, limits.RateLimitItem]:
        """(an id of the bearer key, its rate limit), or `ApiError` 401."""
        header = request.headers.get("authorization", "").strip()
        if not header:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        scheme, _, token = header.partition(" ")
        digest, match = _hash(token.strip()), None
        for h, limit in self.accepted:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(digest, h):
                match = limit
        if scheme.lower() != "bearer" or match is None:  # the scheme is case-insensitive (RFC 9110 11.1)
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return digest.hex()[:16], match

    def rate_limit(self, key_id: str, limit: limits.RateLimitItem) -> None:
        """Count a request against the key's moving window; `ApiError` 429 with Retry-After once it is full."""
        if not self.limiter.hit(limit, key_id):
            reset = self.limiter.get_window_stats(limit, key_id).reset_time
            wait = max(1, math.ceil(reset - time.time()))
            raise ApiError(429, f"Rate limit reached ({limit} for this key); retry in {wait} s",
                           type_="requests", code="rate_limit_exceeded", headers={"Retry-After": str(wait)})

    async def read_and_validate(self, request: Request, route: str) -> dict:
        """The request body, read up to `max_body_bytes` (else 413), parsed and validated (else 400/404)."""
        too_large = ApiError(413, f"request body over {self.cfg.max_body_bytes} bytes", code="request_too_large")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_body_bytes:
            raise too_large
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > self.cfg.max_body_bytes:
                raise too_large
        body = parse_body(raw)
        validate(body, route, self.cfg)
        return body

    def _busy(self, b: Upstream, delta: int) -> None:
        b.in_flight += delta
        self.metrics.in_flight.labels(b.url).set(b.in_flight)

    async def _release(self, b: Upstream, resp: httpx.Response) -> None:
        self._busy(b, -1)
        await resp.aclose()

    def _failed(self, b: Upstream) -> None:
        self.metrics.upstream_errors.labels(b.url).inc()
        self.pool.mark(b, False)

    async def pick_backend(self, route: str, body: dict, gone: _Disconnect) -> tuple[Upstream, httpx.Response]:
        """Send the request to healthy backends (least busy or round robin) until one answers 200: (backend,
        response), the backend counted busy until the caller `_release`s it. Fails over on connection errors
        (refused, reset, a connect timeout) and 5xx; a read timeout is a 504 (the backend has the request and may
        still be working on it); any other status is the backend's error; none left is a 503."""
        tried: set[str] = set()
        while (b := self.pool.pick(tried)) is not None:
            tried.add(b.url)
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {b.key}"} if b.key else {})}
            request = httpx.Request("POST", b.url + route.removeprefix("/v1"), headers=headers,
                                    content=encode_body({**body, "model": b.model}), extensions=self.timeout)
            self._busy(b, 1)  # from the moment it is sent: llama-server sends a non-streamed answer's headers when done
            answered = False
            try:
                resp = await gone.run(self.transport.handle_async_request(request))
                if not (answered := resp.status_code == 200):
                    try:
                        raw = await gone.run(resp.aread())
                    finally:
                        await resp.aclose()
            except httpx.ConnectTimeout:
                self._failed(b)
                continue
            except httpx.TimeoutException:
                raise _timed_out(b) from None
            except httpx.TransportError:
                self._failed(b)
                continue
            finally:
                if not answered:
                    self._busy(b, -1)
            if answered:
                return b, resp
            if resp.status_code < 500:
                raise backend_error(resp.status_code, raw, route)
            self._failed(b)
        raise ApiError(503, "no healthy backend", type_="server_error", code="no_healthy_backend",
                       headers={"Retry-After": str(math.ceil(self.cfg.cooldown_s))})

    def _redactor(self, redactors: dict, choice: dict) -> StreamRedactor:
        return redactors.setdefault(choice.get("index", 0),
                                    StreamRedactor(self.output_filter, self.cfg.stream_holdback_chars,
                                                   self.cfg.stream_filter_every_chars))

    def _filter_choices(self, chunk: dict, field, redactors: dict, final: bool) -> None:
        for choice in chunk.get("choices") or []:
            text = _get_text(choice, field)
            r = self._redactor(redactors, choice)
            out = r.feed(text) if isinstance(text, str) else ""
            if final or choice.get("finish_reason"):
                out += r.flush()
            if isinstance(text, str) or out:
                _set_text(choice, field, out)

    async def filter_output(self, chunk: dict, field, redactors: dict, final: bool) -> None:
        """Redact a chunk's (or a whole answer's) text in place. The filter may take milliseconds (Presidio), so it
        runs in a worker thread, not on the event loop, where it would stall every other connection; text the
        filter's cheap `may_contain` test clears (most prose), or that is only held back, skips the thread hop."""
        if all(self._redactor(redactors, c).cheap(t if isinstance(t := _get_text(c, field), str) else "",
                                                  final or bool(c.get("finish_reason")))
               for c in chunk.get("choices") or []):
            self._filter_choices(chunk, field, redactors, final)
        else:
            await asyncio.to_thread(self._filter_choices, chunk, field, redactors, final)

    async def complete(self, route: str, body: dict, gone: _Disconnect) -> JSONResponse:
        """A non-streamed answer: read whole (failing over while nothing has reached the client), filtered."""
        while True:
            b, resp = await self.pick_backend(route, body, gone)
            try:
                raw = await gone.run(resp.aread())
                break
            except httpx.TimeoutException:
                raise _timed_out(b) from None
            except httpx.TransportError:  # nothing reached the client yet: another backend may answer
                self._failed(b)
            finally:
                await self._release(b, resp)
        if (data := _json_object(raw)) is None:
            raise ApiError(502, f"backend {b.url} answered with invalid JSON", "server_error", code="backend_error")
        self.metrics.usage(data.get("usage"))
        if "model" in data:  # the name the client asked for, not the backend's alias
            data["model"] = self.cfg.model
        if self.output_filter:
            redactors: dict = {}
            await self.filter_output(data, _text_field(route, False), redactors, True)
            self.metrics.redactions.inc(sum(r.redactions for r in redactors.values()))
        return JSONResponse(data)

    async def stream(self, route: str, body: dict, gone: _Disconnect, start: float) -> StreamingResponse:
        """A streamed answer: fails over until a backend's first event, then relays events filtered; a failure
        after that is an error event in the stream. The backend is released however the stream ends."""
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        body = {**body, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        while True:  # until a backend delivers its first event: before that, failing over is safe
            b, resp = await self.pick_backend(route, body, gone)
            it = _data_lines(resp)
            try:
                first = await gone.run(anext(it))
                break
            except httpx.TimeoutException:
                await self._release(b, resp)
                raise _timed_out(b) from None
            except (httpx.TransportError, StopAsyncIteration):
                self._failed(b)
                await self._release(b, resp)
            except BaseException:  # ClientGone, or cancelled
                await self._release(b, resp)
                raise
        field, redactors, released = _text_field(route, True), {}, False

        async def finish():  # once, from the generator or, if the server never started it, from the response
            nonlocal released
            if not released:
                released = True
                self.metrics.redactions.inc(sum(r.redactions for r in redactors.values()))
                gone.close()
                await self._release(b, resp)

        async def gen():
            first_token, payload, ended = True, first, False
            try:
                while payload != "[DONE]":
                    if (chunk := _json_object(payload)) is None:  # bytes already went out: say so in-band
                        ended = True
                        self.metrics.upstream_errors.labels(b.url).inc()
                        yield _error_event(f"backend sent an event that is not a JSON object: {payload[:80]!r}",
                                           code="backend_error")
                        return
                    self.metrics.usage(chunk.get("usage"))
                    if "model" in chunk:
                        chunk["model"] = self.cfg.model
                    if self.output_filter:
                        await self.filter_output(chunk, field, redactors, False)
                    if not wants_usage:
                        chunk.pop("usage", None)
                    if not _held_back(chunk, field) and (chunk.get("choices") or wants_usage or "error" in chunk):
                        if first_token and any(_get_text(c, field) for c in chunk.get("choices") or []):
                            self.metrics.ttft.observe(time.perf_counter() - start)
                            first_token = False
                        yield f"data: {json.dumps(chunk)}\n\n"
                    payload = await gone.run(anext(it, "[DONE]"))
                yield "data: [DONE]\n\n"
                ended = True
            except httpx.TransportError as e:  # bytes already went out: no retry, tell the client in-band
                ended = True
                self._failed(b)
                yield _error_event(f"backend failed mid-stream: {e}")
            except ClientGone:
                pass
            finally:  # also reached when the server drops the generator because a send to the client failed
                self.metrics.cancelled.inc(not ended)
                await finish()

        return _Stream(gen(), finish, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def proxy(self, request: Request, route: str) -> Response:
        """A completion request from the client to a backend and back; 499 if the client leaves first."""
        start = time.perf_counter()
        self.rate_limit(*self.authenticate(request))
        body = await self.read_and_validate(request, route)
        gone = _Disconnect(request)
        try:
            if body.get("stream"):
                return await self.stream(route, body, gone, start)
            try:
                return await self.complete(route, body, gone)
            finally:
                gone.close()
        except ClientGone:
            self.metrics.cancelled.inc()
            return Response(status_code=499)
        except BaseException:
            gone.close()
            raise

    async def models(self, request: Request) -> JSONResponse:
        self.authenticate(request)
        return JSONResponse({"object": "list", "data": [{"id": self.cfg.model, "object": "model", "created": 0,
                                                         "owned_by": "aletheia"}]})

    async def prometheus(self, request: Request) -> Response:
        self.authenticate(request)
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def health(self) -> JSONResponse:
        """200 while a backend is healthy, else 503; no key needed."""
        healthy = sum(b.healthy for b in self.pool.backends)
        return JSONResponse({"status": "ok" if healthy else "no healthy backend", "healthy_backends": healthy,
                             "backends": len(self.pool.backends)}, status_code=200 if healthy else 503)


def create_app(cfg: GatewayConfig, keys: dict[str, str], output_filter: Callable[[str], list[Span]] | None, *,
               transport: httpx.AsyncBaseTransport | None = None):
    """The FastAPI app; `keys` maps each accepted bearer key to its rate limit, `output_filter` maps text to
    (start, end, replacement) spans (None: no filter). `transport` replaces the network to the backends (tests).
    The endpoints are plain Starlette routes: they take the raw request, so FastAPI's per-request dependency solving
    and response serialisation would only cost time."""
    gateway = Gateway(cfg, keys, output_filter, transport=transport)
    app = FastAPI(title="Aletheia gateway", lifespan=gateway.lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(_Observe, metrics=gateway.metrics)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)

    async def chat_completions(request: Request) -> Response:
        return await gateway.proxy(request, "/v1/chat/completions")

    async def completions(request: Request) -> Response:
        return await gateway.proxy(request, "/v1/completions")

    async def health(request: Request) -> JSONResponse:
        return await gateway.health()

    for path, endpoint, method in (("/v1/chat/completions", chat_completions, "POST"),
                                   ("/v1/completions", completions, "POST"), ("/v1/models", gateway.models, "GET"),
                                   ("/metrics", gateway.prometheus, "GET"), ("/health", health, "GET")):
        app.add_route(path, endpoint, methods=[method])
    return app


def run(cfg: GatewayConfig) -> None:
    """Serve the gateway with uvicorn until interrupted (`aletheia gateway --config FILE`)."""
    import uvicorn

    app = create_app(cfg, load_keys(cfg), make_filter(cfg.output_filter))
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", access_log=False)


def write_config(cfg: GatewayConfig, path: str | os.PathLike) -> Path:
    return files.write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def launch(cfg: GatewayConfig, keys: Sequence[str], *, config_path: str | os.PathLike | None = None,
           log_path: str | os.PathLike | None = None, startup_timeout_s: float = 120):
    """Run `aletheia gateway` in a subprocess (same lifecycle as the model servers): a context manager yielding a
    `serve.Server` whose key is `keys[0]`. The keys reach the process through `cfg.keys_env`, never argv."""
    if not keys or not cfg.keys_env:
        raise GatewayError("launch needs at least one key and cfg.keys_env to pass it in")
    config_path = config_path or tempfile.mkstemp(prefix="gateway-", suffix=".yaml")[1]
    write_config(cfg, config_path)
    cmd = [sys.executable, "-m", "aletheia_utils.cli", "gateway", "--config", config_path]
    env = {**os.environ, cfg.keys_env: ",".join(keys)}
    return serve.launch("gateway", cmd, host=cfg.host, port=cfg.port, model=cfg.model, api_key=keys[0],
                        startup_timeout_s=startup_timeout_s, log_path=log_path, env=env)
