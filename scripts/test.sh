#!/usr/bin/env bash
# The test command README gives. Runs the whole suite on CPU (gloo); multi-process tests start their own ranks.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q tests "$@"
