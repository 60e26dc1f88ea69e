#!/usr/bin/env bash
# Train with the DeepSpeed launcher (ZeRO-1/2/3 from the JSON config).
#
#   bash launch/deepspeed.sh --config configs/dist_ema.toml --store runs/exp2/snapshots
#   DS_CONFIG=configs/ds_zero3.json NUM_GPUS=8 bash launch/deepspeed.sh --store s3://bucket/exp2/snapshots
#   # several nodes (pdsh/ssh to the hosts of the hostfile; the store must be shared, e.g. s3://):
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node-0 bash launch/deepspeed.sh --store s3://bucket/exp3/snapshots
#
# Without a hostfile NUM_GPUS (default 2) is the number of ranks; with one, the hostfile's slots are
# (NUM_GPUS, when set, caps every node). On a machine without GPUs NUM_GPUS is the number of CPU
# processes (the launcher starts one process unless told), DS_ACCELERATOR=cpu is set, and each
# concurrent launch needs its own MASTER_PORT (the launcher's default is 29500).
# Every argument goes to launch/train.py.
set -euo pipefail
cd "$(dirname "$0")/.."
# the project's .venv (launch/setup_env.sh makes it), unless another environment is active
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
MASTER_PORT=${MASTER_PORT:-29500}
DS_CONFIG=${DS_CONFIG:-configs/ds_zero2.json}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
fi
args=(--master_port "$MASTER_PORT")
if [ -n "${HOSTFILE:-}" ]; then
  # the hostfile's slots decide the ranks per node; NUM_GPUS, when set, caps them on every node
  args+=(--hostfile "$HOSTFILE")
  [ -n "${NUM_GPUS:-}" ] && args+=(--num_gpus "$NUM_GPUS")
  [ -n "${MASTER_ADDR:-}" ] && args+=(--master_addr "$MASTER_ADDR")
else
  args+=(--num_gpus "${NUM_GPUS:-2}")
fi
exec ${DEEPSPEED:-deepspeed} "${args[@]}" launch/train.py --deepspeed_config "$DS_CONFIG" "$@"
