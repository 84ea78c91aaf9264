# Set-up and checks. Every target works on a fresh machine: `install` creates .venv with the CPU build of torch
# first, then the package with every dependency pinned by requirements.lock (so a release tomorrow changes nothing,
# and nothing pulls another torch build). `make lock` regenerates the lock from the newest releases inside the
# declared ranges, only if the fast suite passes on them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev install-eval install-production demo test test-slow test-all test-floor test-newest lock doctor lint format clean vllm-env test-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0

install: $(BIN)/python
	$(BIN)/pip install -q -c requirements.lock -e .

install-dev: $(BIN)/python
	$(BIN)/pip install -q -c requirements.lock -e ".[dev]"

# lmms-eval without its declared dependencies (they include torchvision, which must not be installed here), then
# the package with the `eval` extra: what lmms-eval needs to run (see docs/evaluation.md).
install-eval: $(BIN)/python
	$(BIN)/pip install -q --no-deps lmms-eval==0.7.3
	$(BIN)/pip install -q -c requirements.lock -e ".[dev,eval]"

# The optional extras of the production paths (quantized weights, `piofvlm serve`): their tests skip without them.
install-production: install-eval
	$(BIN)/pip install -q -c requirements.lock -e ".[dev,eval,quant,serve]"

demo: install
	$(BIN)/piofvlm demo

test: install-production
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: install-production  # pytest exits 5 when no test is marked slow: not a failure
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]

# The fast suite on the declared transformers floor and on the newest release (throw-away venvs; see the script).
test-floor:
	scripts/suite_on_transformers.sh floor

test-newest:
	scripts/suite_on_transformers.sh newest

lock:
	scripts/lock.sh

doctor: install
	$(BIN)/piofvlm doctor

test-all: install-production
	$(BIN)/python -m pytest -q

lint: install-dev
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: install-dev
	$(BIN)/ruff check --fix src tests
	$(BIN)/ruff format src tests

clean:
	rm -rf $(VENV) .venv-lock .venv-tf-* .venv-vllm build dist src/*.egg-info .pytest_cache .ruff_cache

# The vLLM plugin (docs/vllm.md): a separate venv with the CPU build of vLLM, pinned by requirements-vllm.lock (not the
# main lock), and its end-to-end tests (tests/vllm_plugin: 200 test samples per method and family (LLaVA-1.5,
# LLaVA-NeXT, Qwen2.5-VL, Qwen3-VL), the OpenAI server, tensor parallelism 2; about 60 minutes on the 2-core CPU).
# VLLM_SAMPLES=20 for a quicker run; VLLM_K='qwen' (a pytest -k expression) for a part; VLLM_RESULTS keeps the JSON.
VLLM_VENV ?= .venv-vllm
VLLM_SAMPLES ?= 200
VLLM_RESULTS ?= outputs/vllm
VLLM_K ?=

vllm-env:
	scripts/vllm_env.sh $(VLLM_VENV)

test-vllm: vllm-env
	mkdir -p $(VLLM_RESULTS)
	PIOFVLM_VLLM_SAMPLES=$(VLLM_SAMPLES) PIOFVLM_VLLM_RESULTS=$(abspath $(VLLM_RESULTS)) \
		$(VLLM_VENV)/bin/python -m pytest -q -s -p no:cacheprovider tests/vllm_plugin tests/test_vllm_selection.py \
		$(if $(VLLM_K),-k "$(VLLM_K)")
