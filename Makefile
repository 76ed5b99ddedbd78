# devmig developer commands. `make help` lists them.
SHELL := /bin/bash
CACHE ?= $(or $(DEVMIG_CACHE),$(HOME)/.cache/devmig)
# Tools installed by scripts/bootstrap.sh come first on PATH.
export PATH := $(CACHE)/go/bin:$(CACHE)/path:$(PATH)
UV := uv
RUN := $(UV) run --locked --no-sync

.PHONY: help bootstrap demo test test-fast lint fmt cluster-up cluster-down bench clean

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

bootstrap: ## install everything needed (apt, Go, uv, Python deps, control-plane binaries)
	@scripts/bootstrap.sh

demo: bootstrap ## run the local demo on the embedded default
	$(RUN) python -m devmig_testbed.demo

test: bootstrap ## run every test (C, Python, control plane); the last line is pytest's
	$(RUN) pytest

test-fast: ## run the tests without bootstrapping first
	$(RUN) pytest

lint: ## ruff, mypy (strict) and the layering rules
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy
	$(RUN) lint-imports

fmt: ## format the Python code
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

cluster-up: bootstrap ## start the test control plane in the background; prints KUBECONFIG
	$(RUN) devmig-cluster up

cluster-down: ## stop it
	$(RUN) devmig-cluster down

bench: ## run the benchmarks (bench/bench_*.py; see bench/README.md)
	@set -e; n=0; for b in bench/bench_*.py; do [ -e "$$b" ] || continue; n=$$((n+1)); \
	  echo "== $$b"; $(RUN) python "$$b"; done; [ $$n -gt 0 ] || echo "no benchmarks yet in bench/"

clean: ## remove build outputs in the clone (the binary cache is kept)
	rm -rf build .venv .pytest_cache .mypy_cache .ruff_cache
