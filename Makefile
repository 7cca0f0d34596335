# The two quick-start commands: `make demo` and `make test`. Each sets everything up on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch (an unpinned torch pulls a multi-GB CUDA build).
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint bench clean

$(BIN)/lora-merge: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/lora-merge

demo: setup
	$(BIN)/lora-merge demo --workdir demo-output

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/bench_merge.py

clean:
	rm -rf $(VENV) demo-output bench-work
