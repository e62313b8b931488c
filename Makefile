# gpunode: `make test` sets up what it needs (venv, Debian packages for the lab) and runs
# every test, lab integration included, with one lab path per concern (the converged pair
# on Ubuntu 24.04 with its driver bump, Debian 12 through the Proxmox end-to-end path);
# `make test-matrix` runs the further lab paths (marker `matrix`: rebuilds, Debian 12 and
# Ubuntu 22.04 guests converged like the pair). `make test-fast` runs the unit and parity tests.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install lab-deps test test-matrix test-fast demo schema lint clean clean-lab

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

install: $(STAMP)

lab-deps: $(STAMP)
	$(BIN)/python -m gpunode.lab.cli deps --install

# Two runs: the unit and parity tests (no VMs) spread over the CPUs (pytest-xdist), then the
# lab tests in one process, since their VMs and fresh deploys are session fixtures shared by
# many tests. -v: one line per test; lab_progress (tests/lab_progress.py): a line when a lab
# fixture starts and is ready, and one a minute while a fixture or test is still running;
# -rs: the reason of every skip at the end.
UNIT_JOBS ?= auto
test: install lab-deps
	PYTHONPATH=tests $(BIN)/pytest -n $(UNIT_JOBS) -q -rs --durations=5 -m "not matrix" \
	  $(PYTEST_ARGS) tests/unit tests/parity
	PYTHONPATH=tests $(BIN)/pytest -p lab_progress -v -rs --durations=10 -m "not matrix" \
	  $(PYTEST_ARGS) tests/integration

test-matrix: install lab-deps
	PYTHONPATH=tests $(BIN)/pytest -p lab_progress -v -rs --durations=10 -m matrix \
	  $(PYTEST_ARGS) tests

test-fast: install
	$(BIN)/pytest $(PYTEST_ARGS) -m "not integration" tests/unit tests/parity

# make demo [ENGINE=ansible] [DEMO_ARGS=--keep]: pvesim (simulated Proxmox VE) -> PCI mappings
# and a GPU VM through proxmoxer -> full-stack deploy -> checks -> a streamed chat completion
# -> teardown, through pyinfra or ansible-playbook (src/gpunode/lab/demo.py).
ENGINE ?= pyinfra
demo: install lab-deps
	$(BIN)/python -m gpunode.lab.demo --engine $(ENGINE) $(DEMO_ARGS)

schema: install
	$(BIN)/gpunode schema --out schema/site.schema.json

lint: install
	$(BIN)/ruff check src tests bench inventory deploy checks playbooks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Every lab VM stopped and every lab deleted (gpunode lab down --all --purge), then the lab
# cache: base images, debootstrap packages, the chroot of the apt tests, the default lab.
clean-lab: install
	$(BIN)/gpunode lab down --all --purge
	rm -rf "$$($(BIN)/python -c 'from gpunode.lab.paths import cache_root; print(cache_root())')"
