#!/usr/bin/env bash
# Train on several nodes with torchrun and a c10d rendezvous. Run the same command on every node:
#
#   # node 0 (its address is the rendezvous endpoint):
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#     bash launch/torchrun_multinode.sh --config configs/dist_ema.toml --store s3://bucket/exp1/snapshots
#   # node 1: the same with NODE_RANK=1
#
# The snapshot store must be shared by all nodes (s3://..., or a path on a shared file system):
# every rank writes its own objects into it. Every argument goes to launch/train.py.
# ENTRY replaces the program, e.g. ENTRY="-m dist_ema synthesize" (see launch/synthesize.sh).
# c10d assigns the ranks (NODE_RANK only names the node in logs); RDZV_ID must be the same on every node.
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's .venv (launch/setup_env.sh makes it), unless another environment is active
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
: "${NNODES:?set NNODES (number of nodes)}" "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous, e.g. node 0)}"
NODE_RANK=${NODE_RANK:-0}
MASTER_PORT=${MASTER_PORT:-29500}
NPROC_PER_NODE=${NPROC_PER_NODE:-1}
RDZV_ID=${RDZV_ID:-dist-ema-$MASTER_PORT}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# shellcheck disable=SC2086  # ENTRY may be "-m module": split on purpose
exec ${TORCHRUN:-python launch/run_torchrun.py} --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
  ${ENTRY:-launch/train.py} "$@"
