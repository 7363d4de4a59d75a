# Two entry points, each doing all the set-up on a fresh machine:
#   make demo   - a post-restore Immich on embedded PostgreSQL + Valkey, and the exporter serving it
#   make test   - lint, type checks and the whole test suite against real servers
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test lint system-deps node-deps bench clean image-check

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

lint: $(VENV)/.test-installed
	$(BIN)/ruff check exporter tests dashboards deploy bench scripts
	$(BIN)/mypy

test: $(VENV)/.test-installed system-deps node-deps lint
	$(BIN)/python -m pytest

# Builds the Dockerfile with podman (or docker) and runs the image as deploy/ does: scripts/image_check.py.
# IMAGE_CHECK_FLAGS=--stand-in-base where no registry is reachable (a local python:3.11-slim from Debian).
image-check: $(VENV)/.test-installed
	$(BIN)/python scripts/image_check.py $(IMAGE_CHECK_FLAGS)

bench: $(VENV)/.test-installed
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) tests/node/node_modules .pytest_cache .mypy_cache .ruff_cache
