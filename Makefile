# The two commands of the README:
#   make demo   installs everything, pulls the default model, quantizes it to GGUF, profiles every
#               variant here (memory, speed, clinical accuracy), bundles the best one and verifies it;
#               then an ONNX int8 variant likewise, and serves both bundles on loopback
#   make test   installs everything, runs the whole test suite
# Both start from nothing on a fresh machine; a second run reuses the virtual environment.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles llama.cpp on install. edgecds uses the library only, so skip the
# multimodal library, tools, examples, tests and server (~140 of ~400 build steps remain).
# Add your own, e.g. CMAKE_ARGS=-DGGML_CUDA=on, for a GPU build (and PIP_NO_CACHE_DIR=1 so pip
# does not reuse a cached CPU wheel).
# LLAMA_CPU=native (the default) compiles llama.cpp for this machine's CPU (-march=native): fastest
# here, but the build may not run on another CPU. LLAMA_CPU=portable compiles for any x86-64 CPU with
# AVX2 (no AVX-512, no AMX): what an image or a wheel copied to other machines needs (Dockerfile).
LLAMA_CPU ?= native
LLAMA_CPU_ARGS_native :=
LLAMA_CPU_ARGS_portable := -DGGML_NATIVE=OFF
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF $(LLAMA_CPU_ARGS_$(LLAMA_CPU)) $(CMAKE_ARGS)
JOBS   := $(shell nproc 2>/dev/null || echo 2)

.PHONY: install system-deps demo test clean llama-cmake-args

ifeq ($(filter $(LLAMA_CPU),native portable),)
$(error LLAMA_CPU=$(LLAMA_CPU) is not a target; known: native, portable)
endif

# what CMAKE_ARGS llama-cpp-python is built with (the Dockerfile builds its wheel with them)
llama-cmake-args:
	@echo $(LLAMA_CMAKE_ARGS)

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) \
		$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e '.[build,test,fleet]'
	touch $@

demo: install
	$(BIN)/edgecds models pull default
	$(BIN)/edgecds quantize --output edgecds-out/SmolLM2-135M-Instruct
	$(BIN)/edgecds profile edgecds-out/SmolLM2-135M-Instruct --device auto
	# an ONNX int8 variant measured and scored here too, before the report and the bundles, so
	# both see every variant
	$(BIN)/edgecds quantize --format onnx --types ONNX_INT8 --output edgecds-out/SmolLM2-135M-Instruct
	$(BIN)/edgecds profile edgecds-out/SmolLM2-135M-Instruct --types ONNX_INT8 --device auto
	$(BIN)/edgecds report edgecds-out/SmolLM2-135M-Instruct/results.json -o edgecds-out/report.html
	# the best of every format, then the best ONNX one on its own; both bundles are then served on
	# loopback under a few concurrent clients (edgecds-out/serve-*.json)
	$(BIN)/edgecds bundle edgecds-out/SmolLM2-135M-Instruct/results.json --device auto --output edgecds-out/bundle
	$(BIN)/edgecds verify edgecds-out/bundle.tar
	$(BIN)/edgecds bundle edgecds-out/SmolLM2-135M-Instruct/results.json --device auto --formats onnx --output edgecds-out/bundle-onnx
	$(BIN)/edgecds verify edgecds-out/bundle-onnx.tar
	$(BIN)/python -m edgecds.hwbench.bench.bench_serve edgecds-out/bundle --clients 3 --requests 6 --output edgecds-out/serve-gguf.json
	$(BIN)/python -m edgecds.hwbench.bench.bench_serve edgecds-out/bundle-onnx --clients 3 --requests 6 --output edgecds-out/serve-onnx.json

# Debian packages the tests use: chromium, which playwright drives to open the report (no browser
# download), and strace, which watches every process of a run for network calls (nothing phones home).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_DEPS := chromium strace
system-deps:
	@missing=""; for p in $(SYSTEM_DEPS); do command -v $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing Debian's$$missing for the tests"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; fi

# One pytest-xdist worker a CPU, each pinned to its own (tests/conftest.py), at most 4 (each holds
# models and engines in memory); a test file runs whole on one worker, so its module fixtures are
# built once. TEST_WORKERS=0 runs everything in this process.
TEST_WORKERS ?= $(shell n=$(JOBS); [ "$$n" -gt 4 ] && n=4; echo $$n)

test: install system-deps
	$(BIN)/ruff check toolkit quant hwbench tests
	$(BIN)/mypy toolkit quant hwbench
	$(BIN)/python -m pytest -v --durations=25 -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) edgecds-out
