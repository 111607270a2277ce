#!/usr/bin/env bash
# The unit tier under other CPU kernel sets than this machine's own (ATEN_CPU_CAPABILITY), so a
# test that only passes with one CPU's rounding cannot land unseen (docs/design.md, "Bitwise").
# Usage: bash scripts/test_cpu_capabilities.sh [CAPABILITY ...] [-- PYTEST_ARGS ...]
#   CAPABILITY: default | avx2 | avx512 (the CPU must have it). No CAPABILITY: the next set down
#   from this CPU's best (avx512 -> avx2, avx2 -> default), the case of a machine one step older.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
caps=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do caps+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
if [ ${#caps[@]} -eq 0 ]; then
    if grep -qw avx512f /proc/cpuinfo; then caps=(avx2); else caps=(default); fi
fi
for cap in "${caps[@]}"; do
    case "$cap" in
        default|avx2|avx512) ;;
        *) echo "error: CPU capability '$cap': use default, avx2 or avx512" >&2; exit 2 ;;
    esac
    if [ "$cap" = avx512 ] && ! grep -qw avx512f /proc/cpuinfo; then
        echo "error: this CPU has no AVX-512; capabilities it can run: default, avx2" >&2; exit 2
    fi
    echo "[capabilities] unit tier with ATEN_CPU_CAPABILITY=$cap"
    ATEN_CPU_CAPABILITY="$cap" .venv/bin/python -m pytest -m unit -n "${TEST_WORKERS:-2}" \
        --dist loadfile "$@"
    rc=$?
    if [ "$rc" -eq 5 ]; then echo "error: pytest collected no unit tests" >&2; exit 1; fi
    [ "$rc" -eq 0 ] || exit "$rc"
done
