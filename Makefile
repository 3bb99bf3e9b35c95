# Two entry points: `make demo` (main job on the default model) and `make test`.
# Both create the local virtual environment .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,serve]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/crbp-deploy create hgru-pathfinder --out export/hgru-pathfinder.pt
	$(BIN)/crbp-deploy info export/hgru-pathfinder.pt

test: $(STAMP)
	$(BIN)/python -m pytest

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

clean:
	rm -rf $(VENV) export/*.pt export/*.onnx export/*.json
