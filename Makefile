# The two commands: `make demo` and `make test`. Both set themselves up on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install test test-fast lint demo dev bench screenshots clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite on three workers (many tests wait on servers and subprocesses, so a third
# worker helps on two cores); a file runs in one worker, so its fixtures are shared, and the
# longest files go first (tests/conftest.py's order: xdist would otherwise reorder them).
XDIST := -n 3 --dist loadfile --no-loadscope-reorder

test: $(STAMP) lint
	$(PY) -m pytest -q $(XDIST)

# The first two tiers (unit, emulator): a quick check while working.
test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "unit or emulator"

demo: $(STAMP)
	$(PY) -m example_project.demo

PORT ?= 3000

dev: $(STAMP)
	@echo "Dagster UI: http://127.0.0.1:$(PORT)  (another port: make dev PORT=3001)"
	@echo "Local-server batches stay in progress $${INFRON_LOCAL_IN_PROGRESS_SECONDS:-90} s" \
	  "(INFRON_LOCAL_IN_PROGRESS_SECONDS=300 make dev for longer): watch, then cancel one"
	DAGSTER_HOME=$${DAGSTER_HOME:-$(CURDIR)/.dagster_home} ; mkdir -p $$DAGSTER_HOME ; \
	DAGSTER_HOME=$$DAGSTER_HOME $(VENV)/bin/dagster dev -m example_project.definitions \
	  -h 127.0.0.1 -p $(PORT)

bench: $(STAMP)
	$(PY) -m benchmarks.run

# The README's pictures of the Dagster UI (docs/images/), from a real `dagster dev` driven by
# headless Chromium. Outside CI and `make test`: it needs Debian's chromium and playwright.
CHROMIUM ?= /usr/bin/chromium

screenshots: $(STAMP)
	@test -x $(CHROMIUM) || { echo "$(CHROMIUM) not found: apt-get install -y chromium" \
	  "(or make screenshots CHROMIUM=/path/to/chromium)"; exit 2; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install --quiet playwright
	CHROMIUM=$(CHROMIUM) $(PY) docs/screenshots.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .dagster_home .infron_data
