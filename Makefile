PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e .
	touch $(STAMP)

$(DEV_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP) $(DEV_STAMP)

demo: $(STAMP)
	$(VENV)/bin/toolswarm demo

# Both cores: most integration tests wait on leases, probes and servers, not on the CPU.
test: $(DEV_STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench: $(DEV_STAMP)
	$(PY) bench/state.py
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) .toolswarm .pytest_cache .mypy_cache .ruff_cache
