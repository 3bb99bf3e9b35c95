# Two entry points: `make demo` (the whole path on the bundled model) and `make test`.
# Both create the local virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all setup clean gpu-check

setup: $(STAMP)

# The stamp follows this file too: a changed install line here reinstalls.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,serve,openvino,ray,fp16]'
	# Triton (`serve --engine triton`): only the server files of the wheel (tritonserver 2.51, Python backend,
	# stubs); without its dependencies, which pin numpy<2 for the pytriton Python API this project does not use.
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps nvidia-pytriton==0.7.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crbp-deploy demo

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

# The GPU paths (eager / compiled / CUDA graphs x fp32 / bf16 / fp16): JSON + markdown in docs/; < 8 min.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) export/*.pt export/*.onnx export/*.json
