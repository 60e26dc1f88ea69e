#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and install dist-ema into it.
#   EXTRAS: pip extras to install (default: everything the demo and the tests use)
#   TORCH_SPEC: how to install torch (default torch==2.13.0; use plain "torch" for your platform's build)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-test,s3,plot,deepspeed,demo,lightning,accelerate}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
# torch first, so that no dependency pulls a different (e.g. CUDA) build
python -c "import torch" 2>/dev/null || python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v '^WARNING: Location' || true
python -c "import torch" || { echo "torch failed to install (TORCH_SPEC=$TORCH_SPEC)"; exit 1; }
# DeepSpeed builds no ops at install time; on CPU it is told so by DS_ACCELERATOR=cpu at run time.
# Re-install only when pyproject.toml or the extras changed (an editable install sees code changes anyway).
stamp=".venv/.dist-ema-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1) ${EXTRAS}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! python -c "import dist_ema" 2>/dev/null; then
  DS_BUILD_OPS=0 python -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v '^WARNING: Location' || true
  echo "$want" > "$stamp"
fi
python -c "import dist_ema" || { echo "dist-ema failed to install"; exit 1; }
