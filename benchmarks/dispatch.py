"""Dispatch benchmark: the same routed tokens through four MoE layers on ``--ep`` processes.

    (a) alltoall:                   Megatron's MoELayer + all-to-all, routed experts only;
    (b) alltoall_virtual_adjugates: GroveMoELayer, adjugates as extra experts of Megatron's
                                    all-to-all (one row per (token, expert) and (token, group));
    (c) group_aware:                GroveMoELayer on GroupAwareAlltoAllDispatcher (one row per
                                    (token, EP rank));
    (d) hierarchical:               GroveMoELayer on GroveHierarchicalDispatcher (once per
                                    (token, node) across nodes; here one node, so it is (c):
                                    benchmarks/emulated_cluster.py runs it across nodes).

Each process (gloo on CPU, NCCL with one GPU each when CUDA is available) routes --tokens
tokens uniformly at random and times forward + backward of each layer (slowest rank; the
repetitions interleaved a, b, c, d, then b, c, d, a, ...; median over --iters with its min..max
spread); copies, bytes and adjugate evaluations per token are counted on the wire.

    python benchmarks/dispatch.py --ep 4 --experts 128 --topk 8 --groups 64 --tokens 4096 \\
        --hidden 512 [--json]
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_grove.benchmarking.dispatch import (
    DispatchBenchmark,
    format_dispatch_table,
    run_dispatch_benchmark,
)


def parse_args(argv: list[str] | None = None) -> tuple[DispatchBenchmark, bool]:
    """The benchmark setting and whether to print JSON."""
    parser = argparse.ArgumentParser(
        prog="dispatch.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ep", type=int, default=2, help="expert-parallel processes (default 2)")
    parser.add_argument("--experts", type=int, default=128, help="routed experts E (default 128)")
    parser.add_argument("--topk", type=int, default=8, help="experts per token k (default 8)")
    parser.add_argument("--groups", type=int, default=64, help="expert groups G (default 64)")
    parser.add_argument("--tokens", type=int, default=4096,
                        help="tokens per process (default 4096)")
    parser.add_argument("--hidden", type=int, default=512, help="hidden size H (default 512)")
    parser.add_argument("--ffn", type=int, default=0,
                        help="routed expert FFN size (default 3H/8, as GroveMoE-33B)")
    parser.add_argument("--adjugate-ffn", type=int, default=0,
                        help="adjugate FFN size (default H/16, as GroveMoE-33B)")
    parser.add_argument("--adjugate-scale", type=float, default=0.05, help="lam (default 0.05)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations (default 1)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: NCCL on GPUs when CUDA is available, else gloo on CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    bench = DispatchBenchmark(
        ep=args.ep, experts=args.experts, topk=args.topk, groups=args.groups, tokens=args.tokens,
        hidden=args.hidden, ffn=args.ffn or max(1, 3 * args.hidden // 8),
        adjugate_ffn=args.adjugate_ffn or max(1, args.hidden // 16),
        adjugate_scale=args.adjugate_scale, iters=args.iters, warmup=args.warmup,
        device=args.device, seed=args.seed)
    if bench.problems():
        parser.error("; ".join(bench.problems()))
    return bench, args.json


def main(argv: list[str] | None = None) -> int:
    bench, as_json = parse_args(argv)
    summary = run_dispatch_benchmark(bench)
    print(json.dumps(summary) if as_json else format_dispatch_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
