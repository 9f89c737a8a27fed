"""Hugging Face's `transformers serve` started by `au.serve.transformers_server` (05_serve_vllm's CPU engine), and
the `vllm serve` command line built from the production params."""

from pathlib import Path

import pytest

import aletheia_utils as au
from aletheia_utils.serve import ServerError

pytestmark = pytest.mark.slow  # starts llama.cpp or model servers: not in `make test-fast`

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_transformers_server_with_continuous_batching():
    model_dir = au.models.resolve("embedded:smollm2-135m-instruct")
    with au.serve.transformers_server(model_dir, parallel=2, max_model_len=256, threads=1) as server:
        assert server.model == str(Path(model_dir).resolve()) and server.api_key is None
        api = au.serve.client(server)
        assert [m.id for m in api.models.list()] == [server.model]
        reply = api.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=6, temperature=0)
        assert reply.choices[0].message.content.strip() and reply.usage.completion_tokens <= 6
        result = au.serve.load_test(server, ["What is a mutex?", "What is DNS?"], concurrency=2, requests=2,
                                    max_tokens=6)
        assert result["ok"] == 2 and 0 < result["output_tokens"] <= 12
        # the paged cache is sized from parallel × max_model_len; the library default (90 % of free RAM) is GBs
        assert _rss_mib(server.process.pid) < 2048
    assert server.process.poll() is not None, "the server outlived its context manager"


def test_transformers_server_refuses_a_folder_without_a_model(tmp_path):
    with pytest.raises(ServerError, match="no config.json"):
        au.serve.transformers_server(tmp_path)


def test_vllm_command_from_production_params():
    prod = au.config.load(ROOT / "params" / "deepseek-coder-7b.yaml")
    cmd = au.serve.vllm_command("/models/merged", host=prod.serve.host, port=prod.serve.port, model="coder",
                                tensor_parallel_size=2, max_model_len=prod.serve.max_model_len,
                                gpu_memory_utilization=prod.serve.gpu_memory_utilization)
    assert cmd[:3] == ["vllm", "serve", "/models/merged"]
    flags = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert flags == {"--host": "127.0.0.1", "--port": "8000", "--served-model-name": "coder",
                     "--tensor-parallel-size": "2", "--max-model-len": "4096", "--gpu-memory-utilization": "0.9"}
    assert not any("key" in c.lower() for c in cmd), "the API key travels in VLLM_API_KEY, not argv"
