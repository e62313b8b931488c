# gpunode: `make test` sets up what it needs (venv, Debian packages for the lab) and runs
# every test, lab integration included. `make test-fast` runs the unit and parity tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install lab-deps test test-fast demo schema lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

lab-deps: $(STAMP)
	$(BIN)/python -m gpunode.lab.cli deps --install

test: install lab-deps
	$(BIN)/pytest $(PYTEST_ARGS) tests

test-fast: install
	$(BIN)/pytest $(PYTEST_ARGS) -m "not integration" tests/unit tests/parity

demo: install lab-deps
	$(BIN)/python -m gpunode.demo $(DEMO_ARGS)

schema: install
	$(BIN)/gpunode schema --out schema/site.schema.json

lint: install
	$(BIN)/ruff check src tests bench inventory deploy checks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
