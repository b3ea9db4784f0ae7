# Every target creates .venv when it is missing; nothing else needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
# make test runs the suite in this many processes: most tests wait on real workers, Redis and HTTP.
TEST_WORKERS ?= 2

.PHONY: demo test unit chaos lint format clean help docs

# `make` with no target only creates the venv, as it always did; `make help` lists the targets.
.DEFAULT_GOAL := $(BIN)/python

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Installs pin every dependency to constraints.txt, the versions tested (genq/worker/kombu_fix.py needs them).
$(VENV)/.installed-dev: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: $(VENV)/.installed-dev  ## the main job on embedded defaults: private Redis, simulator, worker pool
	$(BIN)/genq demo

test: $(VENV)/.installed-dev  ## the whole suite (long chaos and scale runs excluded)
	$(BIN)/pytest -n $(TEST_WORKERS) -m "not slow" $(PYTEST_ARGS)

unit: $(VENV)/.installed-dev  ## the unit tests only: no services, under 30 s
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

chaos: $(VENV)/.installed-dev  ## the full chaos run: 500 jobs, kills, Redis crashes, upstream faults
	$(BIN)/pytest tests/chaos tests/model -m slow -s $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev  ## ruff (lint and format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy genq config workers tasks

$(VENV)/.installed-bench: pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]'
	touch $@

.PHONY: bench bench-quick
BENCH_ARGS ?=
bench: $(VENV)/.installed-bench  ## every benchmark against its baseline, full size (~30 min on a loaded 2-vCPU machine); JSON + PNG in bench-results/
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench  ## every benchmark at a small size (on a 2-vCPU machine: 1 min 52 s at load 0.5-0.8, 2 min 35 s at 2.4-2.5, 2 min 47-59 s at 4-5.6, 2026-12-01)
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

docs: $(VENV)/.installed-dev  ## rewrite docs/settings.md from genq/settings.py (a unit test checks it)
	$(BIN)/python -m genq.settings_doc

format: $(VENV)/.installed-dev  ## ruff format and ruff check --fix, in place
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:  ## remove the venv, caches and downloads
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache downloads

.PHONY: ops-deps
OPS_PACKAGES := chromium chromium-driver docker-compose
ops-deps:  ## Debian packages of the Flower browser test and the compose test (they also install them when they can)
	@missing=""; for p in $(OPS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else echo "ops-deps: $(OPS_PACKAGES) already installed"; fi

.PHONY: constraints
CONSTRAINTS_VENV := .venv-constraints
constraints:  ## regenerate constraints.txt: the newest versions pyproject.toml allows, in a scratch venv
	rm -rf $(CONSTRAINTS_VENV)
	$(PYTHON) -m venv $(CONSTRAINTS_VENV)
	$(CONSTRAINTS_VENV)/bin/python -m pip install -q --upgrade pip
	$(CONSTRAINTS_VENV)/bin/pip install -q -e '.[bench]'
	{ sed -n '/^#/p' constraints.txt; $(CONSTRAINTS_VENV)/bin/pip freeze --exclude-editable; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf $(CONSTRAINTS_VENV)

help:  ## this list: every target and what it does
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-zA-Z_-]+):.*## (.*)$$/\1\t\2/' | \
		awk -F '\t' '{ printf "  make %-12s %s\n", $$1, $$2 }'
