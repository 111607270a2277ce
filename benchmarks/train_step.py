"""Training-step benchmark: whole steps (forward, backward, optimizer) of one model on the same
data with four MoE variants, on --ep processes.

    (a) plain:       the same routed MoE without adjugates (Megatron's MoELayer, all-to-all);
    (b) virtual:     Grove, adjugates as extra experts of Megatron's all-to-all (alltoall);
    (c) group_aware: Grove, group-aware dispatch (grove_alltoall, once per destination rank);
    (d) hierarchical: Grove, grove_hierarchical (once per (token, node) across nodes; on one
                     node, as here without parallel.ranks_per_node, it is (c);
                     benchmarks/emulated_cluster.py runs it across nodes).

The four runs are built in every process (Megatron DDP, optimizer, LR schedule, the config's
data) and stepped interleaved, a, b, c, d, then b, c, d, a, ...; repetition i of each trains on
step i's global batch. Printed: per variant the median step time (slowest rank) with its min..max
spread and the median CPU seconds (slowest rank's process time, less disturbed by a loaded
machine), the ratios (c)/(b) and (c)/(a) of both, the copies per token, the losses ((b) and (c)
compute the same function, so theirs agree) and the machine's load average.

    python benchmarks/train_step.py --config configs/tiny_cpu.yaml --ep 2 --steps 7
    python benchmarks/train_step.py --config configs/tiny_cpu_33b_moe.yaml --ep 4 --json
    python benchmarks/train_step.py --config configs/tiny_cpu.yaml model.hidden_size=256

exit codes: 0 ok, 2 bad setting (one line naming the key or flag)
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_grove.benchmarking.train_step import (
    TrainStepBenchmark,
    format_train_step_table,
    run_train_step_benchmark,
    variant_configs,
)
from megatron_grove.config import ConfigError


def parse_args(argv: list[str] | None = None) -> tuple[TrainStepBenchmark, bool]:
    """The benchmark setting and whether to print JSON; exits 2 on a bad setting."""
    parser = argparse.ArgumentParser(
        prog="train_step.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True,
                        help="YAML run configuration of a Grove model (e.g. configs/tiny_cpu.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of config keys, as for launch/pretrain_grove.py")
    parser.add_argument("--ep", type=int, default=2,
                        help="expert-parallel processes (= data-parallel size; default 2)")
    parser.add_argument("--steps", type=int, default=5,
                        help="timed steps of each variant (default 5)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed steps of each variant first (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: gloo processes; cuda: NCCL, one GPU per process")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object (step_time_s per variant, spreads, ratios, "
                             "losses, copies per token)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error(f"--steps {args.steps} must be >= 1 and --warmup {args.warmup} >= 0")
    bench = TrainStepBenchmark(config=args.config, overrides=args.overrides, ep=args.ep,
                               steps=args.steps, warmup=args.warmup, device=args.device)
    try:
        variant_configs(bench)
    except ConfigError as exc:
        parser.error(str(exc))
    return bench, args.json


def main(argv: list[str] | None = None) -> int:
    bench, as_json = parse_args(argv)
    summary = run_train_step_benchmark(bench)
    print(json.dumps(summary) if as_json else format_train_step_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
