# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test test-cluster lint install install-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps: the package is installed in editable mode, so only a changed pyproject.toml
# (dependencies, entry points) needs pip again; `make run` starts at once otherwise.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Install and run Whatslike on the embedded default (one process, SQLite, simulator).
run: install
	$(BIN)/whatslike serve

## Install what the tests need, start the local servers they use, run every check.
test: install-test
	./scripts/services.sh
	./scripts/browser.sh
	$(BIN)/ruff check whatslike tests bench
	$(BIN)/ruff format --check whatslike tests bench
	$(BIN)/mypy
	node --test tests/js/
	$(BIN)/pytest

## The fault tests on a three-node Cassandra cluster (127.0.0.2-4; three JVMs of up to
## 1 GB each, started on demand and left running): a node killed under load.
test-cluster: install-test
	./scripts/services.sh cassandra-cluster
	$(BIN)/pytest -m cluster tests/cluster
