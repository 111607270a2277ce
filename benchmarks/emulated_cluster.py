"""Benchmarks over an emulated cluster: N "nodes" as Linux network namespaces joined by
rate-limited veth links, one torchrun per node, and the bytes that crossed the links from the
kernel's counters, beside the planner's projection for the same link.

    python benchmarks/emulated_cluster.py [cluster flags] dispatch [flags of dispatch.py]
    python benchmarks/emulated_cluster.py [cluster flags] train_step --config C [flags, key=value]

The benchmark is benchmarks/dispatch.py (one MoE layer, dispatch + combine, forward + backward)
or benchmarks/train_step.py (whole training steps), with its variants interleaved as there; its
expert-parallel size is nodes x ranks per node. Each node is a namespace with its own loopback
(ranks of one node talk over it: the "NVLink") and one veth link, rate-limited with tc tbf in
both directions, to a bridge; gloo is bound to the link (GLOO_SOCKET_IFNAME). Only addresses of
198.18.0.0/15 are used, only on interfaces this creates; everything is removed at exit, on
Ctrl-C / SIGTERM and on failure. Needs root and `ip netns`.

Per variant it prints the bytes that crossed the links per repetition (sum of the nodes' link
tx counters, read by each node's first rank between barriers), the planner's projection of
those bytes (plus, for whole steps, the dense gradient all-reduce), the median time, the CPU
seconds and the projected link time. With several --link-gbps the fastest run gives the
compute time (its time less its projected link time), and each slower one is compared with
compute + projected link time.

    python benchmarks/emulated_cluster.py --nodes 2 --ranks-per-node 2 --link-gbps 0.2,10 \\
        dispatch --tokens 2048 --hidden 512 --iters 3
    python benchmarks/emulated_cluster.py --nodes 2 --ranks-per-node 2 --link-gbps 0.4 \\
        train_step --config configs/tiny_cpu_33b_moe.yaml --steps 3 model.hidden_size=256

exit codes: 0 ok, 1 a rank failed (the nodes' logs' last lines are printed), 2 bad setting or
no root / no `ip netns` (one line), 130 interrupted
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_grove.benchmarking.emulated_cluster import (  # noqa: E402
    LINK_DEVICE,
    ClusterUnavailable,
    EmulatedCluster,
    LinkSpec,
    check_can_emulate,
    run_torchrun,
)

BENCHMARKS = ("dispatch", "train_step")
_TIME_KEY = {"dispatch": ("time_s", "cpu_time_s"), "train_step": ("step_time_s", "step_cpu_s")}


def _bench_parser(benchmark: str):
    """The benchmark's own parse_args (benchmarks/dispatch.py, benchmarks/train_step.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    module = __import__(benchmark)
    return module.parse_args


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(
        prog="emulated_cluster.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (default 2)")
    parser.add_argument("--ranks-per-node", type=int, default=2,
                        help="ranks (torchrun processes) per node (default 2)")
    parser.add_argument("--link-gbps", default="1",
                        help="each node link's rate per direction in Gbit/s; several, "
                             "comma-separated, run one after the other (default 1)")
    parser.add_argument("--link-delay-ms", type=float, default=0.0,
                        help="one-way delay per link (needs the netem qdisc; refused where the "
                             "kernel lacks it)")
    parser.add_argument("--mtu", type=int, default=9000, help="link MTU (default 9000)")
    parser.add_argument("--timeout-s", type=float, default=1800,
                        help="stop a run that takes longer (default 1800)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("benchmark", nargs="?", choices=BENCHMARKS,
                        help="dispatch (one MoE layer) or train_step (whole steps)")
    parser.add_argument("args", nargs=argparse.REMAINDER,
                        help="the benchmark's own flags (see its --help); --ep is set for you")
    args = parser.parse_args(argv)
    if args.worker:
        return args, None, []
    if args.benchmark is None:
        parser.error("name the benchmark: dispatch or train_step")
    try:
        speeds = [float(s) for s in args.link_gbps.split(",")]
    except ValueError:
        parser.error(f"--link-gbps {args.link_gbps!r}: give Gbit/s numbers, comma-separated")
    specs = [LinkSpec(args.nodes, args.ranks_per_node, g, args.link_delay_ms, args.mtu)
             for g in speeds]
    problems = sorted({p for s in specs for p in s.problems()})
    if problems:
        parser.error("; ".join(problems))
    ep = args.nodes * args.ranks_per_node
    bench, as_json = _bench_parser(args.benchmark)([f"--ep={ep}", *args.args])
    if bench.ep != ep:
        parser.error(f"--ep {bench.ep}: over the emulated cluster EP is --nodes x "
                     f"--ranks-per-node = {ep}; drop --ep")
    bench = dataclasses.replace(bench, link_device=LINK_DEVICE, device="cpu")
    args.json = args.json or as_json
    return args, bench, specs


# ------------------------------------------------------------------------------- worker
def worker_main(spec_file: str) -> int:
    """One rank under torchrun inside a node namespace; rank 0 writes the raw result."""
    spec = json.loads(Path(spec_file).read_text())
    if spec["benchmark"] == "dispatch":
        from megatron_grove.benchmarking.dispatch import DispatchBenchmark, run_dispatch_rank

        raw = run_dispatch_rank(DispatchBenchmark(**spec["settings"]))
    else:
        from megatron_grove.benchmarking.train_step import TrainStepBenchmark, run_train_step_rank

        raw = run_train_step_rank(TrainStepBenchmark(**spec["settings"]))
    if raw is not None:
        Path(spec["result"]).write_text(json.dumps(raw))
    return 0


# ------------------------------------------------------------------------------- one run
class RunFailed(RuntimeError):
    pass


def _run_once(benchmark: str, bench, spec: LinkSpec, timeout_s: float) -> tuple[dict, dict]:
    """The benchmark's raw rank-0 result and the run's link totals (kernel counters, the whole
    run, start-up included) on a fresh cluster of ``spec``."""
    with EmulatedCluster(spec) as cluster, tempfile.TemporaryDirectory() as tmp:
        spec_file, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps({"benchmark": benchmark, "result": str(result),
                                         "settings": dataclasses.asdict(bench)}))
        env = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                             if p)}
        before, began = cluster.link_bytes(), time.perf_counter()
        codes = run_torchrun(cluster, [str(Path(__file__).resolve()), "--worker", str(spec_file)],
                             Path(tmp), env, timeout_s)
        wall = time.perf_counter() - began
        after = cluster.link_bytes()
        if any(codes) or not result.exists():
            tails = [f"node {i} (exit {c}): "
                     + " | ".join((Path(tmp) / f"node{i}.log").read_text().splitlines()[-3:])
                     for i, c in enumerate(codes)]
            raise RunFailed("a rank failed on the emulated cluster; " + "; ".join(tails))
        totals = {d: sum(a - b for a, b in zip(after[d], before[d])) for d in ("tx", "rx")}
        return json.loads(result.read_text()), {"wall_s": wall, "link_bytes": totals}


def _summarize(benchmark: str, bench, raw: dict, load_before: float) -> tuple[dict, dict]:
    """The benchmark's own summary and the planner's projection for one run."""
    from megatron_grove.benchmarking import link_projection as lp

    if benchmark == "dispatch":
        from megatron_grove.benchmarking.dispatch import summarize_dispatch

        summary = summarize_dispatch(bench, raw, load_before)
        return summary, lambda spec: lp.project_layer_on_links(
            spec, bench.experts, bench.topk, bench.groups, bench.hidden, bench.tokens)
    from megatron_grove.benchmarking.train_step import summarize_train_step, variant_configs
    from megatron_grove.planner import plan_parameters
    from megatron_grove.runtime import single_process_world

    configs = variant_configs(bench)
    summary = summarize_train_step(bench, configs, raw, load_before)
    plans = {}
    with single_process_world(device="cpu"):
        for variant, cfg in configs.items():
            plans[variant] = plan_parameters(cfg)
    dense = {v: p.dense_params for v, p in plans.items()}
    if len(set(dense.values())) != 1:
        raise RuntimeError(f"the variants' dense parameters differ: {dense}")
    return summary, lambda spec: lp.project_step_on_links(
        spec, configs, plans["group_aware"].moe_layers, dense["group_aware"])


def run(benchmark: str, bench, specs: list[LinkSpec], timeout_s: float) -> dict:
    time_key, cpu_key = _TIME_KEY[benchmark]
    runs = []
    for spec in specs:
        load_before = os.getloadavg()[0]
        raw, totals = _run_once(benchmark, bench, spec, timeout_s)
        summary, project = _summarize(benchmark, bench, raw, load_before)
        projection = project(spec)
        runs.append({"link": dataclasses.asdict(spec), "uptime_load": list(os.getloadavg()),
                     "run": totals, "summary": summary, "projection": projection})
    # the fastest link's run: its time less its projected link time is the compute time
    fastest = max(runs, key=lambda r: r["link"]["link_gbps"])
    for r in runs:
        s, proj = r["summary"], r["projection"]
        r["per_variant"] = {}
        for v in proj:
            measured = s["link_bytes"][v]
            row = {"link_bytes": measured, "projected_link_bytes": proj[v]["link_bytes"],
                   "bytes_ratio": measured / proj[v]["link_bytes"],
                   "time_s": s[time_key][v], "cpu_s": s[cpu_key][v],
                   "projected_link_s": proj[v]["link_s"]}
            if len(runs) > 1:
                compute = max(0.0, fastest["summary"][time_key][v]
                              - fastest["projection"][v]["link_s"])
                row.update(compute_s=compute, projected_time_s=compute + proj[v]["link_s"],
                           time_ratio=s[time_key][v] / (compute + proj[v]["link_s"]))
            r["per_variant"][v] = row
    return {"benchmark": benchmark, "settings": dataclasses.asdict(bench),
            "nodes": specs[0].nodes, "ranks_per_node": specs[0].ranks_per_node,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "runs": runs}


def format_table(out: dict) -> str:
    lines = []
    for r in out["runs"]:
        link = r["link"]
        lines.append(
            f"{out['benchmark']} over {out['nodes']} nodes x {out['ranks_per_node']} ranks, link "
            f"{link['link_gbps']:g} Gbit/s per direction (MTU {link['mtu']}); whole run "
            f"{r['run']['link_bytes']['tx'] / 1e6:.1f} MB over the links in "
            f"{r['run']['wall_s']:.0f} s; load {r['summary']['load_average'][0]:.1f} -> "
            f"{r['uptime_load'][0]:.1f} (uptime 1/5/15 min: "
            f"{' '.join(f'{x:.2f}' for x in r['uptime_load'])})")
        lines.append(f"  {'variant':<27} {'link MB':>9} {'projected':>9} {'ratio':>6} "
                     f"{'time s':>8} {'CPU s':>7} {'link s*':>8} {'compute s':>9} "
                     f"{'proj. s':>8} {'ratio':>6}")
        for v, row in r["per_variant"].items():
            extra = (f"{row['compute_s']:>9.3f} {row['projected_time_s']:>8.3f} "
                     f"{row['time_ratio']:>6.2f}" if "compute_s" in row else f"{'-':>9} "
                     f"{'-':>8} {'-':>6}")
            lines.append(f"  {v:<27} {row['link_bytes'] / 1e6:>9.2f} "
                         f"{row['projected_link_bytes'] / 1e6:>9.2f} {row['bytes_ratio']:>6.3f} "
                         f"{row['time_s']:>8.3f} {row['cpu_s']:>7.3f} "
                         f"{row['projected_link_s']:>8.3f} {extra}")
    per = "layer (forward + backward)" if out["benchmark"] == "dispatch" else "step"
    lines.append(f"  (per {per}, medians; link MB: sum of the nodes' link tx counters; "
                 "projected / link s*: the planner at this link speed"
                 + (", whole steps with the dense gradient all-reduce" if per == "step" else "")
                 + "; compute s: the fastest link's time less its link s*)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, bench, specs = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    prog = "emulated_cluster.py"
    try:
        check_can_emulate()
        out = run(args.benchmark, bench, specs, args.timeout_s)
    except ClusterUnavailable as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted ({exc or 'Ctrl-C'}); the emulated cluster was removed",
              file=sys.stderr)
        return 130
    print(json.dumps(out) if args.json else format_table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
