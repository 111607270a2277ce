#!/usr/bin/env bash
# README command 1: set up if needed, then pretrain the tiny Grove-ready MoE on CPU with
# expert parallelism across 2 processes. Extra arguments are config overrides (key=value).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # torchrun's default, without its banner
# megatron_grove.launch: torchrun's flags, and the job's own exit code (docs/fault_tolerance.md)
exec .venv/bin/python -m megatron_grove.launch --nproc-per-node 2 launch/pretrain_grove.py \
    --config configs/tiny_cpu.yaml parallel.expert_model_parallel_size=2 "$@"
