# Two commands for a newcomer: `make run` (the gateway on its embedded default config) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench install

$(BIN)/gateway: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[embedded,test]'
	touch $@

install: $(BIN)/gateway

run: install
	$(BIN)/gateway serve --config config/gateway.yaml

test: install
	$(BIN)/ruff check gateway tests
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python -m pytest -q tests/perf -s
