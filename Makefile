# Two entry points: `make demo` and `make test`. Both create .venv on first use and
# reinstall only when pyproject.toml or requirements.lock changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint docs install bench bench-peers gpu-check clean chromium

# scripts/install.sh is the one install path: the Dockerfile runs the same two steps.
$(STAMP): pyproject.toml requirements.lock scripts/install.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	scripts/install.sh $(PY) deps
	scripts/install.sh $(PY) package --editable
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wsipipe demo --out demo-out

# The whole suite, as CI runs it: the lint gates first, then every test.
test: lint chromium
	$(PY) -m pytest -q --durations=30 tests

# Pure and unit tests only (no slide pipelines, servers, clusters or browsers): the edit loop.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# Style, types, the import layering of docs/architecture.md, and a docs build that fails on
# a broken link or a page missing from the nav.
lint: $(STAMP)
	$(VENV)/bin/ruff check wsipipe flows tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir build/site

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# The report tests render pages in Debian's headless Chromium; install it once if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

bench: $(STAMP)
	$(PY) bench/bench_tiling.py

# On a machine with one NVIDIA GPU: install, CUDA tests, device decode, the inference benchmark
# and end-to-end slides/hour in ~8 minutes; writes bench/results/gpu-check.json (docs/gpu.md).
gpu-check:
	bash bench/gpu_check.sh

# Tiling per CPU-second against TIAToolbox, the naive read_region loop and the decode bound
# (bench/bench_peers.py). The peers live in their own virtualenv (bench/peers/install.sh).
PEERS_VENV := bench/.venv-peers
PEERS_STAMP := $(PEERS_VENV)/.installed
$(PEERS_STAMP): bench/peers/requirements.txt bench/peers/install.sh
	bench/peers/install.sh $(PYTHON) $(PEERS_VENV)
	@touch $(PEERS_STAMP)

bench-peers: $(STAMP) $(PEERS_STAMP)
	$(PY) bench/bench_peers.py $(BENCH_PEERS_ARGS)

clean:
	rm -rf demo-out .pytest_cache build/site
