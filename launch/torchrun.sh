#!/usr/bin/env bash
# Train on one node with torchrun: NPROC_PER_NODE ranks (GPUs, or CPU processes with gloo).
#
#   bash launch/torchrun.sh --config configs/dist_ema.toml --engine fsdp2 --store runs/exp1/snapshots
#   NPROC_PER_NODE=8 bash launch/torchrun.sh --engine zero2 --store s3://bucket/exp1/snapshots
#
# Every argument goes to launch/train.py (see: python launch/train.py --help).
# --standalone: a private rendezvous on a free local port, so several runs can share a machine.
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's .venv (launch/setup_env.sh makes it), unless another environment is active
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
NPROC_PER_NODE=${NPROC_PER_NODE:-2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec ${TORCHRUN:-python launch/run_torchrun.py} --standalone --nproc-per-node "$NPROC_PER_NODE" launch/train.py "$@"
