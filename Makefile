# The two commands of the README:
#   make demo   installs everything, pulls the default model, quantizes it to GGUF, profiles every
#               variant here (memory, speed, clinical accuracy), bundles the best one and verifies it
#   make test   installs everything, runs the whole test suite
# Both start from nothing on a fresh machine; a second run reuses the virtual environment.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# llama-cpp-python compiles llama.cpp on install. edgecds uses the library only, so skip the
# multimodal library, tools, examples, tests and server (~140 of ~400 build steps remain).
# Add your own, e.g. CMAKE_ARGS=-DGGML_CUDA=on, for a GPU build (and PIP_NO_CACHE_DIR=1 so pip
# does not reuse a cached CPU wheel).
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF $(CMAKE_ARGS)
JOBS   := $(shell nproc 2>/dev/null || echo 2)

.PHONY: install browser demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$(JOBS) \
		$(BIN)/python -m pip install --progress-bar off -c constraints.txt -e '.[build,test]'
	touch $@

demo: install
	$(BIN)/edgecds models pull default
	$(BIN)/edgecds quantize --output edgecds-out/SmolLM2-135M-Instruct
	$(BIN)/edgecds profile edgecds-out/SmolLM2-135M-Instruct --device auto
	$(BIN)/edgecds report edgecds-out/SmolLM2-135M-Instruct/results.json -o edgecds-out/report.html
	$(BIN)/edgecds bundle edgecds-out/SmolLM2-135M-Instruct/results.json --device auto --output edgecds-out/bundle
	$(BIN)/edgecds verify edgecds-out/bundle.tar.gz

# The report test opens the page in Debian's chromium (no browser download: playwright drives this one).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { echo "installing Debian's chromium for the report test"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; }

test: install browser
	$(BIN)/ruff check toolkit quant hwbench tests
	$(BIN)/mypy toolkit quant hwbench
	$(BIN)/python -m pytest -v $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) edgecds-out
