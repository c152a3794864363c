# Each target builds its own virtual environment (.venv) and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp

.PHONY: demo test test-slow bench simulations clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP)-base: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e .
	touch $@

$(STAMP)-test: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test,bench]'
	touch $@

$(STAMP)-exp: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q -e '.[test,bench,experiments]'
	touch $@

demo: $(STAMP)-base
	$(PY) -m distq.demo

test: $(STAMP)-test
	$(PY) -m pytest -q -m "not slow" -n 2

test-slow: $(STAMP)-test
	$(PY) -m pytest -q -m slow

bench: $(STAMP)-exp
	$(PY) experiments/bench_scalar.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
