#!/usr/bin/env bash
# Set up .venv (see setup_env.sh) and run the demonstration end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
mkdir -p out
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
start=$(date +%s)
echo "== plan: reconstruction error of the demo's schedule (tracked 0.05 and 0.10, a snapshot every 25 of 300 steps)"
dist-ema error --tracked 0.05 0.10 --snapshot-every 25 --steps 300 \
  --targets 0.03 0.05 0.07 0.10 0.13 0.16 0.20 0.24 --plot out/profiles.png
# train on 2 ranks -> snapshots -> distributed synthesis of a sigma_rel sweep -> held-out table + plot.
# Extra arguments go to launch/run_demo.py (e.g. --steps 200, --lr 0.02, --engine zero2, --store s3://bucket/demo/snapshots,
# --native-kernels: this CPU's fastest kernels instead of the pinned ones, figures then vary between CPUs).
python launch/run_demo.py "$@"
echo "demo.sh: done in $(( $(date +%s) - start )) s (after environment setup)"
