"""Plot per-expert and per-group token load over training steps from a run's metrics.jsonl.

    .venv/bin/python tools/plot_load.py runs/tiny_cpu/metrics.jsonl --groups 4 --out runs/tiny_cpu/plots

Writes, per MoE layer, ``expert_load_layer{L}.png`` (heatmap: step x expert, share of the
layer's tokens), and ``group_load_layer{L}.png`` when ``--groups`` is given (groups of
contiguous experts, as in Grove MoE), plus ``imbalance.png``: max/mean expert load per layer
over steps (1.0 = perfectly balanced).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_grove.cli import fail
from megatron_grove.training.load_plots import plot_load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="a run's metrics.jsonl")
    parser.add_argument("--out", type=Path, default=None, help="folder for the PNGs "
                        "(default: plots/ beside metrics.jsonl)")
    parser.add_argument("--groups", type=int, default=None, help="expert groups (moe.num_expert_groups)")
    args = parser.parse_args(argv)
    if not args.metrics.is_file():
        return fail("plot_load.py", f"{args.metrics}: no such file")
    try:
        paths = plot_load(args.metrics, args.out or args.metrics.parent / "plots", args.groups)
    except ValueError as exc:
        return fail("plot_load.py", exc)
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
