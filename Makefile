# Dev loop of opero. `make help` lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
MATURIN := VIRTUAL_ENV=$(abspath $(VENV)) $(VENV)/bin/maturin
# opero's optional features and the benchmark's anchors go in as extras; the
# development tools come from pyproject's [dependency-groups] (PEP 735, pip >= 25.1).
EXTRAS ?= all,bench
GROUPS ?= dev
# Python versions `make test-all` runs on: each gets its own .venv-X.Y. 3.11 is
# required; the others run when an interpreter for them is found.
VERSIONS ?= 3.11 3.12 3.13
PYENV_ROOT ?= $(HOME)/.pyenv

.PHONY: help venv deps redis-server install build-dev build-prod test test-rust test-python \
        test-all lint check-abi wheel format bench docs clean

help: ## Show this help.
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/bin/maturin:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade 'pip>=25.1' 'maturin>=1.9,<2'

venv: $(VENV)/bin/maturin ## Create .venv with pip (>= 25.1, for --group) and maturin.

deps: venv ## Install the development tools of pyproject's dependency groups into .venv.
	@# a .venv made before the groups existed has an older pip: upgrade it (a no-op otherwise)
	$(PY) -m pip install -q 'pip>=25.1'
	$(PY) -m pip install -q $(foreach g,$(subst $(comma), ,$(GROUPS)),--group $(g))

comma := ,

redis-server: ## Install redis-server from Debian's packages when it is missing (the Redis tests start their own).
	@command -v redis-server >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; \
	  else echo "redis-server missing: sudo apt-get install redis-server (the Redis tests are skipped without it)"; fi; }

install: deps redis-server ## Build the extension (release) and install opero, every extra and the dev tools into .venv.
	$(MATURIN) develop --release --extras $(EXTRAS) --group $(GROUPS)

build-dev: deps ## Build the extension in debug mode into .venv (fast compile, slow code).
	$(MATURIN) develop --extras $(EXTRAS) --group $(GROUPS)

build-prod: deps ## Build the extension in release mode into .venv.
	$(MATURIN) develop --release --extras $(EXTRAS) --group $(GROUPS)

test-rust: ## cargo test of the pure Rust cores.
	cargo test --quiet

test-python: ## pytest over the bindings and the Python layer.
	$(PY) -m pytest -q

test: install lint test-rust test-python ## Install, lint, then run cargo test and pytest.

test-all: ## make test on 3.11, then install and pytest on each other Python of VERSIONS found (.venv-X.Y).
	$(MAKE) test
	@for v in $(filter-out 3.11,$(VERSIONS)); do \
	  py=$$(PYENV_ROOT=$(PYENV_ROOT) .ci/find-python $$v); \
	  if [ -z "$$py" ]; then echo "== Python $$v: no interpreter found, skipped"; continue; fi; \
	  echo "== Python $$v: $$py"; \
	  $(MAKE) install test-python PYTHON=$$py VENV=.venv-$$v GROUPS=test || exit 1; \
	done

lint: deps check-abi ## cargo fmt/clippy, the 3.14/3.14t checks, ruff, mypy --strict and stubtest.
	cargo fmt --check
	cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches .ci
	$(VENV)/bin/ruff format --check python tests benches .ci
	$(VENV)/bin/mypy --strict python/opero
	$(PY) -m mypy.stubtest opero._opero_core

# The bindings compile for interpreters this machine does not have: PyO3 reads the
# target's configuration from PYO3_CONFIG_FILE (version, ABI, build flags), and
# `cargo check` does not link, so no libpython is needed. Each target gets its own
# target dir so the checks do not invalidate the main build's cache. No 3.13t:
# pyo3 0.30 refuses free-threaded builds below 3.14 ("PyO3 does not support the
# free-threaded build of CPython versions below 3.14").
ABI_TARGETS ?= 3.14 3.14t
check-abi: ## cargo check of the bindings for CPython 3.14 and free-threaded 3.14t (no interpreter needed).
	@for t in $(ABI_TARGETS); do \
	  v=$${t%t}; flags=""; lib=python$$v; \
	  case $$t in *t) flags=Py_GIL_DISABLED; lib=python$${v}t;; esac; \
	  dir=target/abi-$$t; mkdir -p $$dir; \
	  printf '%s\n' implementation=CPython version=$$v shared=true abi3=false \
	    lib_name=$$lib pointer_width=64 build_flags=$$flags \
	    suppress_build_script_link_lines=false > $$dir/pyo3-config.txt; \
	  echo "== cargo check --features python for CPython $$t"; \
	  PYO3_CONFIG_FILE=$(CURDIR)/$$dir/pyo3-config.txt CARGO_TARGET_DIR=$$dir \
	    cargo check --quiet --all-targets --features python || exit 1; \
	done

wheel: venv ## Build a release manylinux_2_17 wheel (zig linker, no Docker) and the sdist into dist/.
	$(PY) -m pip install -q 'ziglang>=0.13'
	PATH=$(abspath $(VENV))/bin:$$PATH $(MATURIN) build --release --zig --compatibility manylinux_2_17 --interpreter $(PY) --out dist
	$(MATURIN) sdist --out dist

format: deps ## Format Rust and Python sources.
	cargo fmt
	$(VENV)/bin/ruff format python tests benches .ci
	$(VENV)/bin/ruff check --fix python tests benches .ci

bench: install ## Install, then run the comparison benchmark (python -m opero bench).
	$(PY) -m opero bench

docs: install ## Install, then build the documentation site (strict).
	$(VENV)/bin/mkdocs build --strict

clean: ## Remove build output.
	rm -rf target site dist python/opero/*.so python/opero/__pycache__
