# Two entry points: `make demo` and `make test`. Both create .venv on first use and
# reinstall only when pyproject.toml or requirements.lock changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install bench clean chromium

# scripts/install.sh is the one install path: the Dockerfile runs the same two steps.
$(STAMP): pyproject.toml requirements.lock scripts/install.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	scripts/install.sh $(PY) deps
	scripts/install.sh $(PY) package --editable
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/wsipipe demo --out demo-out

test: $(STAMP) chromium
	$(PY) -m pytest -q tests

# The report tests render pages in Debian's headless Chromium; install it once if missing.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
chromium:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }

bench: $(STAMP)
	$(PY) bench/bench_tiling.py

clean:
	rm -rf demo-out .pytest_cache
