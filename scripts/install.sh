#!/usr/bin/env bash
# Creates .venv (Python 3.11) with the pinned engine and installs this repo in editable mode.
# Usage: bash scripts/install.sh [--test]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--test" ]; then
  python -m pip install -q -r requirements-test.txt
fi
python -m pip install -q --no-deps --no-build-isolation -e .
python -c "import torch, megatron.core, transformers; print('installed: torch', torch.__version__, '| megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)"
