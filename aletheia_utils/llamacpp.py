"""llama.cpp's own tools, built from the source of the installed llama-cpp-python (06_gguf, 07_serve_cpu).

`aletheia setup-llama-cpp` (run by `make setup`) downloads the source distribution of exactly the installed
llama-cpp-python version from PyPI, unpacks its `vendor/llama.cpp` into the cache and builds `llama-server`,
`llama-imatrix` and `llama-quantize` there, so the converter, the quantizer and the server never drift apart.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from . import files, models

PACKAGE = "llama-cpp-python"
# llama.cpp's AMX kernels segfault on the first matmul on some AMX CPUs (Xeon, seen here; ggml-org/llama.cpp#20824):
# on x86-64 the native build leaves them out. `make setup` builds llama-cpp-python with the same flags.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
TOOLS = ("llama-server", "llama-imatrix", "llama-quantize")


def compiler_flags() -> list[str]:
    """CMake definitions for a build for this CPU without llama.cpp's AMX kernels (x86-64 only)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    return [f"-DCMAKE_C_FLAGS={NO_AMX}", f"-DCMAKE_CXX_FLAGS={NO_AMX}"]


class SetupMissing(RuntimeError):
    """llama.cpp's tools are not set up yet."""


def version() -> str:
    return importlib.metadata.version(PACKAGE)


def home() -> Path:
    """Cache folder for this llama-cpp-python version's llama.cpp source and build."""
    return models.cache_root() / f"llama.cpp-{version()}"


def source_dir() -> Path:
    return home() / "src"


def converter() -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` from the installed version's source."""
    path = source_dir() / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise SetupMissing(f"{path} is missing: run `make setup` (or `aletheia setup-llama-cpp`)")
    return path


def converter_env() -> dict[str, str]:
    """Environment for the converter: the vendored `gguf-py` first, so it matches the converter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(source_dir() / "gguf-py"), env.get("PYTHONPATH")]))
    return env


def tool(name: str) -> Path:
    """One of llama.cpp's `TOOLS` (`llama-server`, `llama-imatrix`, `llama-quantize`), built from the same source."""
    path = home() / "bin" / name
    if not os.access(path, os.X_OK):
        raise SetupMissing(f"{path} is missing: run `make setup` (or `aletheia setup-llama-cpp`)")
    return path


def server_binary() -> Path:
    """llama.cpp's own `llama-server`."""
    return tool("llama-server")


def fetch() -> Path:
    """Download the sdist of the installed version and unpack its vendored llama.cpp into `source_dir()`."""
    if (source_dir() / "CMakeLists.txt").is_file():
        return source_dir()
    home().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home()) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                        f"{PACKAGE}=={version()}", "-d", tmp], check=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar, files.atomic_write(source_dir()) as src:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name.removeprefix(prefix)
            tar.extractall(src, members=[m for m in members if m.name], filter="data")
    return source_dir()


def build(jobs: int | None = None) -> Path:
    """Build the `TOOLS` missing from `home()/bin` for this CPU (cmake; `compiler_flags`); each binary is moved into
    place only when complete. Returns the bin folder."""
    bin_dir = home() / "bin"
    missing = [name for name in TOOLS if not os.access(bin_dir / name, os.X_OK)]
    if not missing:
        return bin_dir
    build_dir = home() / "build"
    cmake = shutil.which("cmake")
    if cmake is None:
        raise SetupMissing(f"cmake is not installed; it is needed to build {', '.join(missing)}")
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run([cmake, "-S", str(fetch()), "-B", str(build_dir), *generator, "-DCMAKE_BUILD_TYPE=Release",
                    "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
                    *compiler_flags()], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build_dir), "--target", *missing, "-j", str(jobs or os.cpu_count())],
                   check=True)
    for name in missing:
        with files.atomic_write(bin_dir / name) as tmp:
            shutil.copy2(build_dir / "bin" / name, tmp)
    shutil.rmtree(build_dir)
    return bin_dir


def setup() -> dict[str, str]:
    """Fetch the source and build the tools if they are not cached yet."""
    bin_dir = build()
    return {"version": version(), "converter": str(fetch() / "convert_hf_to_gguf.py"),
            **{name: str(bin_dir / name) for name in TOOLS}}
