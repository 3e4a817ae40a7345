# Every target creates the virtualenv it needs; a fresh machine needs only python3 (>= 3.11).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install lint test dev clean contracts contracts-check

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install contracts-check
	$(BIN)/ruff check ledger admin_api workers contracts tests
	$(BIN)/ruff format --check ledger admin_api workers contracts tests
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -n 2 --dist loadfile $(PYTEST_ARGS)

# The compiler and OpenZeppelin come from npm (contracts/package-lock.json); reinstalled only when the lock
# file is newer than node_modules. The build itself writes contracts/artifacts, which are committed.
contracts/node_modules: contracts/package-lock.json
	cd contracts && npm ci --no-audit --no-fund
	touch $@

contracts: contracts/node_modules
	node contracts/build.mjs

# Fails when the committed artifacts are not exactly what the sources compile to.
contracts-check: contracts/node_modules
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	node contracts/build.mjs "$$tmp" > /dev/null && \
	if diff -r "$$tmp" contracts/artifacts; then \
		echo "contracts-check: artifacts rebuild byte for byte"; \
	else \
		echo "contracts-check: contracts/artifacts differ from a fresh build of the sources;" \
			"run 'make contracts' and commit contracts/artifacts" >&2; \
		exit 1; \
	fi

dev: install
	$(BIN)/tracechain dev

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
