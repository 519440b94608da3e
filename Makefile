# `make demo` and `make test` work on a fresh clone: they create .venv and install what is needed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SUM := $(shell cksum < pyproject.toml | cut -d' ' -f1)
LIGHT := $(VENV)/.light-$(SUM)
FULL := $(VENV)/.full-$(SUM)
# the CPU build of torch: plain PyPI's wheel brings several GB of CUDA libraries
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: install light browser demo test lint format docs clean

install: $(FULL)
light: $(LIGHT)

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# prediction and the web service: numpy, Pillow, OpenCV, ONNX Runtime, FastAPI, uvicorn, tqdm
$(LIGHT): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	rm -f $(VENV)/.light-* && touch $@

# training, evaluation, export and the tests: torch (CPU), safetensors, onnx, matplotlib, pytest,
# ruff, httpx, selenium; torch from PyTorch's CPU index where it answers, else as pip finds it
$(FULL): $(LIGHT)
	$(PY) -m pip install -q --timeout 10 --retries 1 --index-url $(TORCH_CPU_INDEX) $(TORCH) \
	  2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	rm -f $(VENV)/.full-* && touch $@

demo: $(LIGHT)
	$(VENV)/bin/agegender demo --out demo-output

test: install browser
	$(PY) -m pytest -q

# The web page's test drives Debian's chromium through chromedriver (about 45 s to install the
# first time, as root with apt); without them that one test is skipped with its reason.
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium and chromium-driver for the browser test ..."; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q chromium chromium-driver >/dev/null; } || \
	      echo "could not install chromium: the browser test will be skipped"; \
	  else echo "no chromium/chromedriver (apt needs root): the browser test will be skipped"; fi; \
	fi

lint: install
	$(VENV)/bin/ruff check src tests benchmarks tools
	$(VENV)/bin/ruff format --check src tests benchmarks tools

format: install
	$(VENV)/bin/ruff format src tests benchmarks tools
	$(VENV)/bin/ruff check --fix src tests benchmarks tools

# the documentation site from docs/ and mkdocs.yml, into build/site/ (offline, self-contained)
docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf demo-output .pytest_cache .ruff_cache build dist src/*.egg-info
