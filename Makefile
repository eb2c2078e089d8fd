# Two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: train test lint typecheck pytest plan clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,mpi]"
	touch $(STAMP)

# The main job: 4 CPU ranks (torchrun, gloo) train the tiny GPT on the stdlib corpus with the adaptive planner.
NPROC ?= 4
TRAIN_ARGS ?=
train: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m cli.train $(TRAIN_ARGS)

plan: $(STAMP)
	$(BIN)/sp-plan

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy planner sp trainer cli models

pytest: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

clean:
	rm -rf $(VENV) runs outputs .pytest_cache .mypy_cache .ruff_cache
