"""What keeping long runs safe costs, measured (CPU; see benchmarks/resilience_runs.py).

    checksum  save / manifest / verify / load times of one training state of a config
    async     training stall of an asynchronous save (checkpoint.async_save) vs a synchronous one
    rss       resident memory of every worker over a whole torchrun of a config
    signal    seconds from a signal to the workers' and torchrun's exit, and the step saved
    stragglers  the straggler exchange's cost per step (a run with it every step, one without)

    python benchmarks/resilience.py checksum --config configs/tiny_cpu.yaml [key=value ...]
    python benchmarks/resilience.py async --config configs/tiny_cpu.yaml [key=value ...]
    python benchmarks/resilience.py rss --config configs/tiny_cpu.yaml train.iters=600
    python benchmarks/resilience.py signal --config configs/tiny_cpu.yaml --after-steps 20 \\
        checkpoint.save=/tmp/ckpt
    python benchmarks/resilience.py stragglers --config configs/tiny_cpu.yaml train.iters=60
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile

from resilience_runs import (
    AsyncSaveBenchmark,
    ChecksumBenchmark,
    format_async_save_table,
    format_checksum_table,
    measure_rss,
    measure_signal_to_exit,
    measure_straggler_exchange,
    run_async_save_benchmark,
    run_checksum_benchmark,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="resilience.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("checksum", "async", "rss", "signal", "stragglers"))
    parser.add_argument("--config", required=True, help="YAML run configuration")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    parser.add_argument("--nproc", type=int, default=2, help="processes (default 2)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="checksum, async: saves (default 3)")
    parser.add_argument("--step-s", type=float, default=0.25,
                        help="async: seconds of each emulated training step (default 0.25)")
    parser.add_argument("--folder", help="checksum, async: save there (default: a temporary folder)")
    parser.add_argument("--interval", type=float, default=2.0,
                        help="rss: seconds between samples (default 2)")
    parser.add_argument("--after-steps", type=int, default=10,
                        help="signal: send it once this many steps are logged (default 10)")
    parser.add_argument("--signal", default="SIGTERM", choices=("SIGTERM", "SIGINT", "SIGUSR1"))
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.what == "checksum":
        summary = run_checksum_benchmark(ChecksumBenchmark(
            config=args.config, overrides=args.overrides, nproc=args.nproc,
            repeats=args.repeats, folder=args.folder))
        print(format_checksum_table(summary))
    elif args.what == "async":
        summary = run_async_save_benchmark(AsyncSaveBenchmark(
            config=args.config, overrides=args.overrides, nproc=args.nproc,
            repeats=args.repeats, step_s=args.step_s, folder=args.folder))
        print(format_async_save_table(summary))
    else:
        with tempfile.TemporaryDirectory() as log_dir:
            if args.what == "rss":
                samples = measure_rss(args.config, args.overrides, args.nproc, args.interval,
                                      log_dir)
                for s in samples:
                    print(f"{s['t_s']:8.1f} s  step {s['step']:6d}  RSS MiB "
                          + " ".join(f"{r:8.1f}" for r in s["rss_mib"]))
                summary = {"samples": samples}
            elif args.what == "stragglers":
                summary = measure_straggler_exchange(args.config, args.overrides, args.nproc,
                                                     log_dir)
                print(", ".join(f"{k} {v:.4g}" for k, v in summary.items()))
            else:
                summary = measure_signal_to_exit(args.config, args.overrides, args.nproc,
                                                 args.after_steps, signal.Signals[args.signal],
                                                 log_dir)
                print(", ".join(f"{k} {v}" for k, v in summary.items()))
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
