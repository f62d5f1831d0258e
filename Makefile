# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint install install-test mutation

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

$(VENV)/.installed-mutation: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,mutation]'
	touch $@

## Mutation testing of the pure cores (docs/mutation.md): slow and CPU-heavy, so one
## worker at the lowest priority, bounded by MUTATION_TIMEOUT seconds; not in CI nor in
## `make test`. Starts afresh (mutants/ is removed) and ends with the score per module.
MUTATION_TIMEOUT ?= 3600
mutation: $(VENV)/.installed-mutation
	rm -rf mutants
	timeout $(MUTATION_TIMEOUT) nice -n 19 $(BIN)/mutmut run --max-children 1 > /dev/null
	$(BIN)/mutmut results --all true | LC_ALL=C awk -F': ' \
	  '{ k = $$1; sub(/^ +/, "", k); sub(/\.x.*/, "", k); n[k]++; all++ } \
	   $$2 == "killed" || $$2 == "timeout" { ok[k]++; killed++ } \
	   $$2 != "killed" && $$2 != "timeout" { print "  " $$2 ": " substr($$1, 5) } \
	   END { for (m in n) printf "%-34s %4d of %4d killed  %5.1f %%\n", m, ok[m], n[m], 100 * ok[m] / n[m]; \
	         printf "%-34s %4d of %4d killed  %5.1f %%\n", "all", killed, all, 100 * killed / all }'
