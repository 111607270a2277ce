"""Time each Triton kernel against its eager torch reference and torch.compile of it, on GPU.

    python benchmarks/kernels.py [--config configs/grovemoe_33b_a3b.yaml] [--tokens 8192]
                                 [--ep 8] [--dtype bf16] [--json out.json]

Shapes come from the config's MoE layer (hidden, expert FFN, adjugate FFN, E, G, top-k) for
``--tokens`` tokens on one EP rank of ``--ep``: routing is uniform at random, so each kernel
sees the row counts of a balanced layer. Per kernel and pass (forward, forward+backward):
median milliseconds of eager torch, torch.compile and Triton, and Triton's speed-up over eager.
Without a CUDA GPU it says so and exits 0 (nothing to measure; the kernels' correctness tests
run on CPU under Triton's interpreter).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROG = "kernels.py"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "grovemoe_33b_a3b.yaml"),
                        help="run config whose MoE layer shapes are used")
    parser.add_argument("--tokens", type=int, default=8192, help="tokens per step on this rank")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size: this rank holds E/ep experts and G/ep groups")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found): nothing measured. The "
              "kernels' correctness tests run on CPU: pytest tests/test_kernels.py")
        return 0
    from megatron_grove.benchmarking.kernels import time_kernels
    from megatron_grove.cli import fail
    from megatron_grove.config import ConfigError, load_config
    from megatron_grove.megatron_config import TORCH_DTYPES

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        return fail(PROG, f"config error: {exc}")
    if not cfg.moe.num_expert_groups or cfg.moe.num_expert_groups % args.ep:
        return fail(PROG, f"--ep {args.ep} must divide moe.num_expert_groups="
                          f"{cfg.moe.num_expert_groups} (> 0)")
    print(f"{torch.cuda.get_device_name()}; {args.config}; {args.tokens} tokens, EP={args.ep}, "
          f"{args.dtype}; median of {args.repeats} (ms)")
    print(f"{'kernel':58s} {'pass':17s} {'eager':>8s} {'compile':>8s} {'triton':>8s} "
          f"{'vs eager':>8s}")

    def report(row: dict) -> None:
        print(f"{row['kernel']:58s} {row['pass']:17s} {row['eager']:8.3f} {row['compile']:8.3f} "
              f"{row['triton']:8.3f} {row['eager'] / row['triton']:7.2f}x", flush=True)

    results = time_kernels(cfg, args.tokens, args.ep, TORCH_DTYPES[args.dtype], args.repeats,
                           report)
    if args.json:
        path = Path(args.json)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
