#!/usr/bin/env bash
# The test command of the README: set up .venv if needed (scripts/setup_env.sh), then run the whole suite on the CPU.
# Extra arguments go to pytest (e.g. `bash scripts/run_tests.sh -k models -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
venv="${MAMMO_VENV:-.venv}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" MPLBACKEND=Agg PYTHONUNBUFFERED=1
set +e
"$venv/bin/python" -m pytest -q -ra "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
    echo "run_tests: pytest collected no tests; that is a failure for this project" >&2
    exit 1
fi
exit "$status"
