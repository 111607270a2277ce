#!/usr/bin/env bash
# README command 2: set up if needed, then run the whole test suite. Fails if no test ran.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# test files spread over TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so
# its module fixtures are built once); TEST_WORKERS=0 runs them in this process; -n N overrides
.venv/bin/python -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
