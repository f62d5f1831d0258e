# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What `make lock` resolves with (uv, from PyPI, into the venv) and how: one lock for every
# platform (Linux x86_64 and aarch64 alike, markers where they differ) from Python 3.11 on,
# with the hash of every wheel and sdist of each pinned version.
UV_VERSION := 0.13.8
UV_COMPILE = $(BIN)/uv pip compile --quiet --universal --python-version 3.11 --generate-hashes \
	--custom-compile-command 'make lock' $(LOCK_FLAGS)

# A dependency of pyproject.toml that the lock lacks (it was not run again) is named here.
CHECK_LOCKED = @$(BIN)/pip check >/dev/null || { $(BIN)/pip check; echo "make: the locks miss a dependency: run make lock" >&2; exit 1; }

.PHONY: run test test-cluster lint install install-test lock mutation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps: the dependencies come from the hashed locks (pip refuses a file whose hash is not
# in them) and the package itself is installed in editable mode without dependencies, so
# only a changed lock, or pyproject.toml (entry points), needs pip again; `make run` starts
# at once otherwise. The package is built with the locked setuptools, not a fetched one.
$(VENV)/.installed: requirements.lock requirements-build.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock -r requirements-build.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(CHECK_LOCKED)
	touch $@

$(VENV)/.installed-test: requirements-test.lock requirements-build.lock pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --require-hashes -r requirements-test.lock -r requirements-build.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(CHECK_LOCKED)
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

## Resolve pyproject.toml's ranges again into the locks, keeping every pin they still allow
## (`make lock LOCK_FLAGS=--upgrade`: the newest allowed of each). The test lock is held to
## the runtime lock's pins, so both install the same versions.
lock: | $(BIN)/python
	$(BIN)/pip install --quiet uv==$(UV_VERSION)
	$(UV_COMPILE) pyproject.toml -o requirements.lock
	$(UV_COMPILE) pyproject.toml --extra test -c requirements.lock -o requirements-test.lock
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
		| $(UV_COMPILE) - -o requirements-build.lock

## Install and run Whatslike on the embedded default (one process, SQLite, simulator).
run: install
	$(BIN)/whatslike serve

## Install what the tests need, start the local servers they use, run every check: the
## whole suite, then the fault tests on the clusters (`test-cluster`, which starts them).
test: install-test
	./scripts/services.sh
	./scripts/browser.sh
	$(BIN)/ruff check whatslike tests bench
	$(BIN)/ruff format --check whatslike tests bench
	$(BIN)/mypy
	node --test tests/js/
	$(BIN)/pytest
	$(MAKE) --no-print-directory test-cluster

## The fault tests on a three-node Cassandra cluster and three Kafka brokers (127.0.0.2-4;
## JVMs of up to 1 GB and 384 MB each, started on demand and left running): a Cassandra
## node, and the broker leading a partition, killed under load. Part of `make test`.
test-cluster: install-test
	./scripts/services.sh redis cassandra-cluster kafka-cluster
	$(BIN)/pytest -m cluster tests/cluster

# mutmut is a developer's tool outside the locks (like uv for `make lock`), installed over
# the locked test environment.
$(VENV)/.installed-mutation: $(VENV)/.installed-test
	$(BIN)/pip install --quiet 'mutmut>=3.8,<4'
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
