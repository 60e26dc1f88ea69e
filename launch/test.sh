#!/usr/bin/env bash
# Set up .venv (see setup_env.sh) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
. .venv/bin/activate
export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
ruff check .
exec python -m pytest -q "$@"
