#!/usr/bin/env bash
# The test command README gives. Runs the whole suite on CPU (gloo); multi-process tests start their own ranks.
# Two pytest-xdist workers (PYTEST_WORKERS to change; 0 runs in this process), one test file per worker at a time
# so that a file's module fixtures (converted checkpoints, reference runs) are made once: about 1.8x faster than
# one process on CI's 2 cores, since most of a test's time is one process importing or tokenizing.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
export TORCHDYNAMO_DISABLE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec python -m pytest -q tests -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
