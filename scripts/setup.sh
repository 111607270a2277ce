#!/usr/bin/env bash
# Create (or reuse) the project venv in .venv from pyproject.toml alone.
# Usage: bash scripts/setup.sh            # runtime + dev + tools extras
#        EXTRAS=dev bash scripts/setup.sh # choose extras
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-dev,tools}"
VENV=.venv
STAMP="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)-${EXTRAS//,/_}"

find_python312() {
    for cand in "${PYTHON:-}" python3.12 "$HOME/.pyenv/versions/"3.12*/bin/python3.12 /usr/local/bin/python3.12 /usr/bin/python3.12; do
        [ -n "$cand" ] || continue
        if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
            command -v "$cand"; return 0
        fi
    done
    if command -v pyenv >/dev/null 2>&1; then
        local v; v=$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12' | tail -n1 || true)
        if [ -n "$v" ]; then echo "$(pyenv root)/versions/$v/bin/python3.12"; return 0; fi
    fi
    return 1
}

if [ -f "$STAMP" ]; then
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    PY=$(find_python312) || {
        echo "error: Python 3.12 not found (megatron-core 0.19 needs it). Install it, e.g. 'pyenv install 3.12', or set PYTHON=/path/to/python3.12." >&2
        exit 1
    }
    echo "[setup] creating $VENV with $PY"
    "$PY" -m venv "$VENV"
fi
echo "[setup] installing megatron-grove[$EXTRAS] into $VENV (first time: a few minutes, torch is large)"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
rm -f "$VENV"/.installed-*
touch "$STAMP"
echo "[setup] done"
