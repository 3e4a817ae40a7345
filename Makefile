# Every target creates the virtualenv it needs; a fresh machine needs only python3 (>= 3.11).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install lint test dev clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check ledger admin_api workers contracts tests
	$(BIN)/ruff format --check ledger admin_api workers contracts tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

dev: install
	$(BIN)/tracechain dev

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
