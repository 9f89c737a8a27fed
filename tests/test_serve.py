"""llama.cpp's server on loopback, driven through the official openai client; start-up failures and orphans."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import openai
import pytest

import aletheia_utils as au
from aletheia_utils.serve import ServerError

pytestmark = pytest.mark.slow  # starts llama.cpp or model servers: not in `make test-fast`

KEY = "test-key-123"


@pytest.fixture(scope="module")
def gguf():
    return au.models.embedded_gguf("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def server(gguf):
    with au.serve.llama_server(gguf, api_key=KEY, parallel=2, ctx_size=1024) as s:
        yield s
    assert s.process.poll() is not None, "the server outlived its context manager"


def test_chat_stream_and_stop(server):
    api = au.serve.client(server)
    reply = api.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Say hello."}],
                                        max_tokens=200, temperature=0)
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason == "stop"  # ended on the chat template's end-of-turn token
    chunks = list(api.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Say hello."}],
                                              max_tokens=200, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    cut = api.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Count to ten."}],
                                      max_tokens=5, temperature=0)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 5


def test_auth_and_bad_request(server):
    wrong = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        au.serve.client(server).chat.completions.create(model=server.model, messages=[{"role": "nobody"}],
                                                        max_tokens=2)


def test_load_test_reports_latency_and_throughput(server):
    result = au.serve.load_test(server, ["What is a mutex?", "What is DNS?"], concurrency=2, requests=4,
                                max_tokens=8)
    assert result["ok"] == 4 and result["error_rate"] == 0
    assert 0 < result["ttft_p50_s"] <= result["latency_p50_s"] <= result["latency_p99_s"]
    assert 0 < result["output_tokens"] <= 4 * 8 and result["output_tokens_per_s"] > 0


def test_port_in_use(gguf):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServerError, match="already in use"):
            with au.serve.llama_server(gguf, port=taken.getsockname()[1]):
                pass


def test_missing_and_truncated_gguf(tmp_path, gguf):
    with pytest.raises(ServerError, match="no such GGUF"):
        au.serve.llama_server(tmp_path / "nope.gguf")
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(ServerError, match="bad magic"):
        au.serve.llama_server(tmp_path / "text.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(gguf.read_bytes()[:1_000_000])
    start = time.monotonic()
    with pytest.raises(ServerError, match="exited with code") as err:
        with au.serve.llama_server(truncated, startup_timeout_s=60):
            pass
    assert time.monotonic() - start < 30 and "truncated.gguf" in str(err.value)


def test_server_dies_with_a_killed_parent(tmp_path, gguf):
    """A kernel killed mid-notebook (SIGKILL: no cleanup code runs) must not leave its server behind."""
    script = textwrap.dedent(f"""
        import os, signal, aletheia_utils as au
        with au.serve.llama_server({str(gguf)!r}, parallel=1, ctx_size=512) as s:
            print(s.process.pid, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.2)
    assert not _alive(pid), f"llama-server {pid} outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_missing_program_is_a_server_error():
    with pytest.raises(ServerError, match="not installed"):
        with au.serve.launch("nothing", ["/nonexistent/server"], host="127.0.0.1", port=au.serve.free_port(),
                             model="m", api_key=None):
            pass


def test_stock_server_queues_concurrent_streams(gguf):
    """llama-cpp-python's server, the baseline of 07's load test: concurrent streams are queued, none cut short."""
    with au.serve.llama_cpp_python_server(gguf, api_key=KEY, ctx_size=512) as stock:
        result = au.serve.load_test(stock, ["What is a mutex?", "What is DNS?"], concurrency=2, requests=2,
                                    max_tokens=6)
    assert result["ok"] == 2 and result["error_rate"] == 0, result["errors"]
    assert stock.process.poll() is not None
