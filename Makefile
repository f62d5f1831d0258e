# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint install install-test

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
