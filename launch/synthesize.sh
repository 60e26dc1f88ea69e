#!/usr/bin/env bash
# Distributed synthesis: the EMA for new sigma_rels from a run's snapshots, on NPROC_PER_NODE ranks.
#
#   bash launch/synthesize.sh runs/exp1/snapshots --sigma-rel 0.05 0.1 0.15 0.2 --out runs/exp1/synth
#   NPROC_PER_NODE=8 bash launch/synthesize.sh s3://bucket/exp1/snapshots --sigma-rel 0.12 --out s3://bucket/exp1/synth
#   # several nodes: NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node-0 [MASTER_PORT=29501] bash launch/synthesize.sh ...
#
# The world size need not match training's, and the result is the same (bitwise) for any.
# Arguments are those of `dist-ema synthesize` (store URL, --sigma-rel, --out, --format, --t, ...).
# Output: <out>/sigma_rel-<s>/model.safetensors per target (loadable with safetensors.torch.load_file).
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's .venv (launch/setup_env.sh makes it), unless another environment is active
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
NNODES=${NNODES:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$NNODES" -gt 1 ]; then
  : "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous) for a multi-node synthesis}"
  MASTER_PORT=${MASTER_PORT:-29501}
  exec ${TORCHRUN:-python launch/run_torchrun.py} --nnodes "$NNODES" --node-rank "${NODE_RANK:-0}" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-dist-ema-synth-$MASTER_PORT}" \
    -m dist_ema synthesize "$@"
fi
exec ${TORCHRUN:-python launch/run_torchrun.py} --standalone --nproc-per-node "$NPROC_PER_NODE" -m dist_ema synthesize "$@"
