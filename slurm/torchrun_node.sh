#!/usr/bin/env bash
# One node of a multi-node torchrun launch (no Slurm): run the same command on every node, e.g. on 2 nodes of 8 GPUs
#   NNODES=2 RDZV_ENDPOINT=node0.example:29500 RUN_ID=ctx512k slurm/torchrun_node.sh cluster=h100x64 model=llama3-8b ...
# Every argument is a Hydra override of sp-train. The rendezvous is torchrun's c10d backend (its default `static`
# backend would give every node rank 0): the first node to arrive hosts it at RDZV_ENDPOINT, which every node must
# reach; RUN_ID names the job, the same on every node and new for each job. The run folder (train.out_dir, default
# runs/RUN_ID) must be on a filesystem every node shares, as must this checkout and its .venv.
#   NNODES          nodes in the job (required)
#   RDZV_ENDPOINT   host:port of the rendezvous, reachable from every node (required)
#   RUN_ID          rendezvous id and run folder name (default: sp-train)
#   NPROC           ranks per node (default: the node's GPUs from nvidia-smi, else 1)
#   SP_PYTHON       the Python of the checkout's .venv (default: ./.venv/bin/python)
set -euo pipefail

: "${NNODES:?set NNODES, the number of nodes}"
: "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port, reachable from every node}"
RUN_ID=${RUN_ID:-sp-train}
if [[ -z ${NPROC:-} ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [[ $NPROC -gt 0 ]] || NPROC=1
fi
PY=${SP_PYTHON:-$PWD/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
args=("$@")
[[ " $* " == *" train.out_dir="* ]] || args=(train.out_dir="runs/$RUN_ID" "$@")
# one clear error for a misspelt override, before any rank starts
"$PY" -m cli.train --check "${args[@]}"
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC" --rdzv_backend c10d \
  --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "$RUN_ID" -m cli.train "${args[@]}"
