# Entry points, each doing all the set-up it needs on a fresh machine:
#   make demo   - a post-restore Immich on embedded PostgreSQL + Valkey, and the exporter serving it
#   make check  - the fast tier (under a minute): ruff, mypy, actionlint and the unit tests (no servers)
#   make test   - everything: system and node dependencies, the fast tier's linters, the whole suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo check test lint actionlint golden system-deps node-deps bench clean image-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[demo]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/immich-thumbnail-exporter demo

system-deps:
	./scripts/install-system-deps.sh

node-deps: system-deps
	npm ci --prefix tests/node --no-audit --no-fund --loglevel=error

lint: $(VENV)/.test-installed actionlint
	$(BIN)/ruff check exporter tests dashboards deploy bench scripts
	$(BIN)/mypy

# The GitHub workflows, when there are any (none is not an error).
actionlint: $(VENV)/.test-installed
	@set -- $(wildcard .github/workflows/*.yml .github/workflows/*.yaml); \
	if [ $$# -eq 0 ]; then echo "actionlint: no workflow under .github/workflows"; \
	else echo "$(BIN)/actionlint $$*"; $(BIN)/actionlint "$$@"; fi

check: lint
	$(BIN)/python -m pytest -q tests/unit

# Two workers, each taking whole modules (module-scoped servers are started once): most of the suite
# waits on servers and rounds, not on the CPU. Every test takes its own ports, folders and databases.
PYTEST_WORKERS ?= 2
test: $(VENV)/.test-installed system-deps node-deps lint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup --durations=25

# Rewrite tests/golden/metrics.prom from a real exporter run plus made-up data (review the diff).
golden: $(VENV)/.test-installed
	$(BIN)/python -m tests.golden

# Builds the Dockerfile with podman (or docker) and runs the image as deploy/ does: scripts/image_check.py.
# IMAGE_CHECK_FLAGS=--stand-in-base where no registry is reachable (a local python:3.11-slim from Debian).
image-check: $(VENV)/.test-installed
	$(BIN)/python scripts/image_check.py $(IMAGE_CHECK_FLAGS)

bench: $(VENV)/.test-installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache
