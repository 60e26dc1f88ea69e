#!/usr/bin/env bash
# Set up .venv (see setup_env.sh) and run the demonstration end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
mkdir -p out
echo "== reconstruction error of a planned schedule (tracked 0.05 and 0.10, snapshot every 1000 of 100k steps)"
dist-ema error --tracked 0.05 0.10 --snapshot-every 1000 --steps 100000 --plot out/profiles.png
