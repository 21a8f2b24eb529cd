# Dev loop of opero. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MATURIN := VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin
EXTRAS ?= test,docs

.PHONY: help venv redis-server install build-dev build-prod test test-rust test-python lint format bench docs clean

help: ## Show this help.
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 'maturin>=1.7,<2'

venv: $(PY) ## Create .venv with pip and maturin.

redis-server: ## Install redis-server from Debian's packages when it is missing (the Redis tests start their own).
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else echo "redis-server missing: sudo apt-get install redis-server (the Redis tests are skipped without it)"; fi; }

install: venv redis-server ## Build the extension (release) and install opero with every extra into .venv.
	$(MATURIN) develop --release --extras $(EXTRAS)

build-dev: venv ## Build the extension in debug mode into .venv (fast compile, slow code).
	$(MATURIN) develop --extras $(EXTRAS)

build-prod: venv ## Build the extension in release mode into .venv.
	$(MATURIN) develop --release --extras $(EXTRAS)

test-rust: ## cargo test of the pure Rust cores.
	cargo test --quiet

test-python: ## pytest over the bindings and the Python layer.
	$(PY) -m pytest -q

test: install lint test-rust test-python ## Install, lint, then run cargo test and pytest.

lint: venv ## cargo fmt/clippy, ruff, mypy --strict and stubtest.
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches
	$(VENV)/bin/ruff format --check python tests benches
	$(VENV)/bin/mypy --strict python/opero
	$(PY) -m mypy.stubtest opero._opero_core

format: venv ## Format Rust and Python sources.
	cargo fmt
	$(VENV)/bin/ruff format python tests benches
	$(VENV)/bin/ruff check --fix python tests benches

bench: install ## Install, then run the comparison benchmark (python -m opero bench).
	$(PY) -m opero bench

docs: install ## Install, then build the documentation site (strict).
	$(VENV)/bin/mkdocs build --strict

clean: ## Remove build output.
	rm -rf target site python/opero/*.so python/opero/__pycache__
