# Two commands: `make train` and `make test`. Both create .venv on first use.
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: train test test-slow lint typecheck pytest plan clean gpu-deps gpu-check flash-attn

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,mpi]"
	touch $(STAMP)

# The main job: 4 CPU ranks (torchrun, gloo) train the tiny GPT with the adaptive planner on a mixture of long code
# (the stdlib) and short text (pydoc topics), 80/20 by tokens, holding out 0.5% of each source and reporting
# validation loss by token position and needle retrieval by length and depth (up to data.max_len; heatmaps in
# runs/default/eval) every 20 steps.
NPROC ?= 4
DATA_ARGS ?= data=mix
EVAL_ARGS ?= eval.every=20 eval.holdout=0.005 eval.max_docs=16 eval.tasks=[needle]
TRAIN_ARGS ?=
train: $(STAMP)
	@$(BIN)/python -m cli.train --check $(DATA_ARGS) $(EVAL_ARGS) $(TRAIN_ARGS)  # one clear error, not one per rank
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node $(NPROC) -m cli.train $(DATA_ARGS) $(EVAL_ARGS) $(TRAIN_ARGS)

plan: $(STAMP)
	$(BIN)/sp-plan

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy planner sp trainer cli models

pytest: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test: lint typecheck pytest

# The second half of the suite (CI runs both): sweeps over more worlds and architectures, Slurm's requeue hold,
# timeouts waited out, a third launcher, a tiny model trained 300 steps to retrieve needles (2 minutes); each
# behaviour here also has a faster test in `make test`, is a sweep, or is that training run.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

# The CUDA path on a GPU machine: only torch's CUDA build is needed (the default PyPI wheel on Linux x86-64;
# torch's own flash and cuDNN attention ops need no compiler). Runs the gpu suite, then sp-bench gpu, which prints
# one table and appends every row to GPU_OUT/gpu.jsonl. Under 10 minutes on one H100 (planned, not yet measured).
GPU_OUT ?= runs/gpu-check
gpu-check: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu tests/test_gpu.py
	$(BIN)/sp-bench gpu --out $(GPU_OUT)

# Optional: flash-attn 2.8.3 as one more kernel (kernel=flash). It has no wheel for torch 2.13 and is built here
# against the installed torch (nvcc of torch's CUDA major, ninja) for this GPU's architecture only (its default
# builds four), with MAX_JOBS from the free memory at ~9 GB a compile job.
FLASH_SPEC ?= flash-attn==2.8.3
FLASH_ATTN_CUDA_ARCHS ?= $(shell nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d .)
MAX_JOBS ?= $(shell awk '/MemAvailable/ {j = int($$2 / 1048576 / 9); print (j < 1) ? 1 : j}' /proc/meminfo)
flash-attn: $(STAMP)
	$(BIN)/pip install -q -e ".[dev,mpi,gpu]"
	FLASH_ATTN_CUDA_ARCHS=$(FLASH_ATTN_CUDA_ARCHS) MAX_JOBS=$(MAX_JOBS) $(BIN)/pip install --no-build-isolation --no-cache-dir "$(FLASH_SPEC)"
	$(BIN)/python -c "from sp.kernels import flash_attn_status as s; p = s(); print(p or 'flash-attn loads'); raise SystemExit(p is not None)"
gpu-deps: flash-attn

clean:
	rm -rf $(VENV) runs outputs .pytest_cache .mypy_cache .ruff_cache
