# Two commands do all the set-up (see README.md): `make run` and `make test` (`make test-fast`: no slow tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
PARAMS ?= params/default.yaml
NAME   ?=
STAMP  := $(VENV)/.installed
# llama.cpp's AMX kernels segfault on some AMX CPUs (ggml-org/llama.cpp#20824): llama-cpp-python is compiled without
# them on x86-64, as `aletheia setup-llama-cpp` compiles llama-server (aletheia_utils/llamacpp.py), and never taken
# from pip's wheel cache, which would hand back a wheel built earlier with other flags.
NO_AMX := $(if $(filter x86_64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPP_PYTHON := $(shell grep -o '"llama-cpp-python[^"]*"' pyproject.toml)

.PHONY: setup run test test-fast lint lab strip clean

# torch==2.13.0 first: a local CPU wheel satisfies it; an unpinned torch pulls GBs of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	CFLAGS="$(NO_AMX)" CXXFLAGS="$(NO_AMX)" $(BIN)/pip install --no-cache-dir --no-deps $(LLAMA_CPP_PYTHON)
	$(BIN)/pip install -e '.[dev]'
	touch $@

# llama.cpp's converter and llama-server, from the installed llama-cpp-python's source (cached; ~10 min once).
setup: $(STAMP)
	$(BIN)/aletheia setup-llama-cpp

run: setup
	$(BIN)/aletheia run --params $(PARAMS) $(if $(NAME),--run-name $(NAME))

test: setup lint
	$(BIN)/pytest

# The fast lane: ruff, then every test not marked slow (slow: whole notebooks, training, llama.cpp, model servers);
# it needs only the .venv, not the llama.cpp build.
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .

# Jupyter refuses to start as root (most ML containers) unless told to.
lab: setup
	$(BIN)/jupyter lab notebooks/ $(if $(filter 0,$(shell id -u)),--allow-root)

strip: setup
	$(BIN)/nbstripout notebooks/*.ipynb

clean:
	rm -rf $(VENV) runs
