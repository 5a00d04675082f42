# SegViz: `make demo` (set up + run the phantom demo) and `make test` (set up + run the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
export FLWR_DISABLE_UPDATE_CHECK := 1
# torch's OpenMP threads spin while waiting; on a shared 2-core machine that costs 10-30x.
export OMP_WAIT_POLICY := PASSIVE

.PHONY: setup demo lint test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first: the CPU build that lies on disk, so nothing pulls a multi-GB CUDA build.
$(VENV)/.segviz-setup: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[test,slicer]"
	touch $@

setup: $(VENV)/.segviz-setup

demo: setup
	$(BIN)/segviz demo --out demo-out --force

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

bench: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python bench/run.py

clean:
	rm -rf demo-out .pytest_cache
