# Two commands for a newcomer: `make run` (the gateway on its default config: Piper and Whisper) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Test workers: one more than the cores, as many tests wait on sockets, timers and subprocesses; at most 8.
# Each worker starts by importing and collecting everything (about 5 s of CPU), so more would cost more.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n + 1 > 8 ? 8 : n + 1 )))
# The suite starts ~40 interpreters (workers, gateway processes): let them share compiled bytecode.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: run test lint bench install

$(BIN)/gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,embedded-lite,fast,test]'
	touch $@

install: $(BIN)/gateway

run: install
	$(BIN)/gateway serve --config config/gateway.yaml

test: install
	$(BIN)/ruff check gateway tests
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: install
	$(BIN)/python -m pytest -q -rs tests/perf -s
