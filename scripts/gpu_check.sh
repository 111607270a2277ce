#!/usr/bin/env bash
# The GPU check in one command, for a fresh single-GPU machine whose image has CUDA, PyTorch and
# Triton but not this project, and no network: installs the dependencies the image lacks from
# wheels brought along in .whl/ (git-ignored), then runs benchmarks/gpu_check.py (the GPU tests,
# benchmarks/kernels.py at the 33B shapes, a short bf16 training run with kernels.backend=triton,
# the training-step benchmark, TE/FP8 when TE imports), within 8 minutes, into one JSON.
#
# 1. Here, with network, fetch the wheels (megatron-core 0.19.2, 2.4 MB: the only dependency the
#    GPU image lacks; torch, triton, numpy, pyyaml, tqdm, tensorboard, tokenizers, pytest come
#    with the image and must NOT be carried, torch least of all):
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#          --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
#          -d .whl megatron-core==0.19.2
# 2. Check everything a CPU can (wheels, imports, scripts, configs, budget):
#      PYTHON=.venv/bin/python bash scripts/gpu_check.sh --plan --out /tmp/gpu_plan.json
# 3. On the GPU machine, from the repository root (carry .whl along):
#      bash scripts/gpu_check.sh --out "$OUT/gpu_check.json"
# Environment: PYTHON (default python3), the interpreter that has torch.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SITE="$(mktemp -d /tmp/grove_site.XXXXXX)"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}" \
        || { echo "gpu_check.sh: error: installing ${wheels[*]} into $SITE failed" >&2; exit 2; }
else
    echo "gpu_check.sh: no wheels in .whl/ (see the pip download at the top of this script)" >&2
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" benchmarks/gpu_check.py --site "$SITE" "$@"
rc=$?
rm -rf "$SITE"
exit $rc
