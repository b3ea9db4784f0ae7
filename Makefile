# Every target creates .venv when it is missing; nothing else needs installing by hand.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: demo test chaos lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed-dev  ## the main job on embedded defaults: private Redis, simulator, worker pool
	$(BIN)/genq demo

test: $(VENV)/.installed-dev  ## the whole suite (long chaos and scale runs excluded)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

chaos: $(VENV)/.installed-dev  ## the full chaos run: 500 jobs, kills, Redis crashes, upstream faults
	$(BIN)/pytest tests/chaos -m slow -s $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy genq config workers tasks simulator

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[bench]'
	touch $@

.PHONY: bench bench-quick
BENCH_ARGS ?=
bench: $(VENV)/.installed-bench  ## every benchmark against its baseline, full size (up to ~20 min); JSON + PNG in bench-results/
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

bench-quick: $(VENV)/.installed-bench  ## every benchmark at a small size (under 2 min)
	$(BIN)/python -m benchmarks --quick $(BENCH_ARGS)

format: $(VENV)/.installed-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache downloads

.PHONY: ops-deps
OPS_PACKAGES := chromium chromium-driver docker-compose
ops-deps:  ## Debian packages of the Flower browser test and the compose test (they also install them when they can)
	@missing=""; for p in $(OPS_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	else echo "ops-deps: $(OPS_PACKAGES) already installed"; fi
