"""environment.yml (conda users) and pyproject.toml (pip users) describe the same environment."""

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_names_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {r.replace(" ", "") for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    listed = {r.replace(" ", "") for r in pip_section if not r.startswith("-e")}
    assert "python=3.11" in env["dependencies"]
    assert "torch==2.13.0" in listed, "conda users get the same pinned torch"
    assert {_name(r) for r in listed} == {_name(r) for r in wanted}
    assert listed - {"torch==2.13.0"} == wanted - {r for r in wanted if _name(r) == "torch"}
    assert any(r.startswith("-e") and "[dev]" in r for r in pip_section), "the pip section installs the package"


def test_vllm_only_in_the_gpu_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(_name(r) == "vllm" for r in project["dependencies"])
    assert any(_name(r) == "vllm" for r in project["optional-dependencies"]["gpu"])


def test_llama_cpp_builds_leave_out_the_amx_kernels_on_x86(monkeypatch):
    """llama.cpp's AMX kernels segfault on some AMX CPUs: llama-server's build passes the flags that leave them out
    on x86-64 (none elsewhere), and the installed llama-cpp-python was compiled without them (the Makefile builds
    it with the same flags, bypassing pip's wheel cache)."""
    import llama_cpp

    from aletheia_utils import llamacpp

    assert "AMX_INT8 = 1" not in llama_cpp.llama_print_system_info().decode(), "llama-cpp-python built with AMX"
    assert f"{llamacpp.NO_AMX})" in (ROOT / "Makefile").read_text(), "the Makefile and llamacpp.py name the same flags"
    monkeypatch.setattr(llamacpp.platform, "machine", lambda: "x86_64")
    assert llamacpp.compiler_flags() == [f"-DCMAKE_C_FLAGS={llamacpp.NO_AMX}", f"-DCMAKE_CXX_FLAGS={llamacpp.NO_AMX}"]
    monkeypatch.setattr(llamacpp.platform, "machine", lambda: "aarch64")
    assert llamacpp.compiler_flags() == []
