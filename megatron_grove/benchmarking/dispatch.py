"""The dispatch benchmark: the same routed tokens through four MoE layers on ``ep`` processes.

    (a) ``alltoall``:                  Megatron's MoELayer + all-to-all, routed experts only;
    (b) ``alltoall_virtual_adjugates``: GroveMoELayer, adjugates as extra experts of Megatron's
                                        all-to-all (one row per (token, expert) and (token, group));
    (c) ``group_aware``:               GroveMoELayer on GroupAwareAlltoAllDispatcher (one row per
                                        (token, EP rank));
    (d) ``hierarchical``:              GroveMoELayer on GroveHierarchicalDispatcher (one row per
                                        (token, node) across nodes, then per (token, rank);
                                        nodes: torchrun's LOCAL_WORLD_SIZE, else one node,
                                        where it is (c)).

Each process (gloo on CPU, NCCL with one GPU each) routes ``tokens`` tokens uniformly at random
(top-k of random scores, the same for all four layers: the router is bypassed) and times
forward + backward of each layer (slowest rank), the repetitions interleaved (a, b, c, d, b, c,
d, a, ...: :func:`~megatron_grove.benchmarking.processes.rotated`) so that a change in the
machine's load hits the four alike; median over ``iters`` and its spread (min, max). A *copy*
is one token row the dispatcher sends to another rank or keeps locally for an expert (what
enters the dispatch all-to-all); bytes are those of the rows and their routing weights in the
dispatch direction (the combine sends the rows back).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from megatron_grove.benchmarking.processes import (
    LinkMeter,
    cpu_threads_per_rank,
    rotated,
    run_on_ranks,
)

__all__ = ["VARIANTS", "DispatchBenchmark", "run_dispatch_benchmark", "run_dispatch_rank",
           "summarize_dispatch", "format_dispatch_table"]

VARIANTS = ("alltoall", "alltoall_virtual_adjugates", "group_aware", "hierarchical")
_DISPATCHER = {"alltoall": "alltoall", "alltoall_virtual_adjugates": "alltoall",
               "group_aware": "grove_alltoall", "hierarchical": "grove_hierarchical"}


@dataclass
class DispatchBenchmark:
    """One benchmark setting (one MoE layer shape on ``ep`` processes)."""

    ep: int = 2
    experts: int = 128
    topk: int = 8
    groups: int = 64
    tokens: int = 4096  # per process
    hidden: int = 512
    ffn: int = 192  # routed expert FFN
    adjugate_ffn: int = 32
    adjugate_scale: float = 0.05
    iters: int = 5
    warmup: int = 1
    device: str = "auto"  # auto: NCCL on GPUs when there are ep of them, else gloo on CPU
    seed: int = 0
    # emulated cluster: the node's link device, whose kernel tx counter the node's first rank
    # reads around every timed repetition (benchmarks/emulated_cluster.py)
    link_device: str | None = None

    def problems(self) -> list[str]:
        """What is wrong with the setting (empty when it can run)."""
        out = []
        if self.ep < 1 or self.experts % self.ep:
            out.append(f"--ep {self.ep} must divide --experts {self.experts}")
        if self.groups < 1 or self.experts % self.groups or self.groups % self.ep:
            out.append(f"--groups {self.groups} must divide --experts {self.experts} and be a "
                       f"multiple of --ep {self.ep}")
        if not 1 <= self.topk <= self.experts:
            out.append(f"--topk {self.topk} must be in 1..{self.experts}")
        if self.device == "cuda" and torch.cuda.device_count() < self.ep:
            out.append(f"--device cuda needs {self.ep} GPUs, found {torch.cuda.device_count()}")
        return out


def _build_layer(args: DispatchBenchmark, variant: str, device: torch.device):
    """The variant's one-layer MoE, through the config path and ``build_moe_layer``."""
    from megatron_grove.config import load_config
    from megatron_grove.megatron_config import to_transformer_config
    from megatron_grove.moe import build_moe_layer

    grove = variant != "alltoall"
    cfg = load_config(None, [
        "model.num_layers=1", f"model.hidden_size={args.hidden}", "model.num_attention_heads=1",
        f"model.ffn_hidden_size={args.ffn}", f"moe.num_experts={args.experts}",
        f"moe.router_topk={args.topk}", f"moe.ffn_hidden_size={args.ffn}",
        f"moe.num_expert_groups={args.groups if grove else 0}",
        f"moe.adjugate_ffn_hidden_size={args.adjugate_ffn}",
        f"moe.adjugate_scale={args.adjugate_scale}", "moe.allow_large_adjugate_scale=true",
        "moe.bias_update_rule=none",
        f"moe.token_dispatcher_type={_DISPATCHER[variant]}",
        f"parallel.expert_model_parallel_size={args.ep}", f"runtime.device={device.type}"])
    return build_moe_layer(to_transformer_config(cfg)).to(device)


class _DispatchMeter:
    """Wraps a layer's ``dispatch`` stage: rows and bytes entering the dispatch all-to-all."""

    def __init__(self, layer) -> None:
        self.rows = self.bytes = 0
        self._dispatch = layer.dispatch
        layer.dispatch = self

    def __call__(self, hidden_states: torch.Tensor, probs: torch.Tensor):
        self.rows += hidden_states.shape[0]
        self.bytes += (hidden_states.numel() * hidden_states.element_size()
                       + probs.numel() * probs.element_size())
        return self._dispatch(hidden_states, probs)


def _uniform_routing(args: DispatchBenchmark, rank: int, device: torch.device):
    """``probs [T, E]`` (softmax over the selection, 0 elsewhere) and ``routing_map [T, E]``."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    scores = torch.rand(args.tokens, args.experts, generator=gen)
    chosen = scores.topk(args.topk).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)
    logits = torch.randn(args.tokens, args.experts, generator=gen)
    probs = torch.softmax(logits.masked_fill(~routing_map, float("-inf")), dim=-1)
    x = torch.randn(args.tokens, 1, args.hidden, generator=gen)
    return probs.to(device), routing_map.to(device), x.to(device)


def _worker(rank: int, init_method: str, args: DispatchBenchmark) -> dict | None:
    import torch.distributed as dist

    from megatron_grove.moe.counters import reset_moe_counters
    from megatron_grove.runtime import destroy_parallel, initialize_parallel

    runtime = initialize_parallel(expert_parallel=args.ep, device=args.device,
                                  init_method=init_method, rank=rank, world_size=args.ep,
                                  timeout_s=600)
    device = runtime.device
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(args.ep))
    probs, routing_map, x = _uniform_routing(args, rank, device)
    layers, meters, router_probs = {}, {}, {}
    for variant in VARIANTS:
        layers[variant] = layer = _build_layer(args, variant, device)
        router_probs[variant] = probs.clone().requires_grad_()
        layer.route = (lambda p: lambda hidden_states, padding_mask=None: (p, routing_map))(
            router_probs[variant])
        meters[variant] = _DispatchMeter(layer)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    link = LinkMeter(args.link_device)
    link_bytes = {v: 0 for v in VARIANTS}
    for it in range(args.warmup + args.iters):
        for variant in rotated(VARIANTS, it):  # interleaved, the order rotating
            layer, meter = layers[variant], meters[variant]
            if it == args.warmup:
                meter.rows = meter.bytes = 0
                reset_moe_counters(layer)
            inp = x.clone().requires_grad_()
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            link.start()
            began, cpu_began = time.perf_counter(), time.process_time()
            y, _ = layer(inp)
            y.backward(torch.ones_like(y))
            if device.type == "cuda":
                torch.cuda.synchronize()
            spent = torch.tensor([time.perf_counter() - began, time.process_time() - cpu_began],
                                 dtype=torch.float64)
            sent = link.stop()
            if it >= args.warmup:
                link_bytes[variant] += sent
            dist.all_reduce(spent, op=dist.ReduceOp.MAX)
            if it >= args.warmup:
                times[variant].append(float(spent[0]))
                cpu_times[variant].append(float(spent[1]))
    result = {}
    for variant in VARIANTS:
        adjugate_rows = getattr(layers[variant], "grove_counters", {}).get("adjugate_rows", 0)
        meter = meters[variant]
        totals = torch.tensor([meter.rows, meter.bytes, adjugate_rows, link_bytes[variant]],
                              dtype=torch.float64)
        dist.all_reduce(totals)
        tokens = args.tokens * args.ep * args.iters
        result[variant] = {"copies": float(totals[0]) / tokens,
                           "bytes": float(totals[1]) / tokens,
                           "adjugate_evals": float(totals[2]) / tokens,
                           "link_bytes": float(totals[3]) / args.iters,
                           "times": times[variant], "cpu_times": cpu_times[variant]}
    destroy_parallel()
    return {"per_variant": result, "device": str(device)} if rank == 0 else None


def run_dispatch_benchmark(args: DispatchBenchmark) -> dict:
    """Spawn ``args.ep`` processes, run the four layers (repetitions interleaved), return the
    summary: medians, their spread (min, max) and ratios."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.device_count() >= args.ep else "cpu"
    load_before = os.getloadavg()[0]
    return summarize_dispatch(args, run_on_ranks(_worker, args.ep, args), load_before)


def run_dispatch_rank(args: DispatchBenchmark) -> dict | None:
    """This process's part of the benchmark when a launcher (torchrun) started it: rank and
    rendezvous from the environment; rank 0 returns the raw result for
    :func:`summarize_dispatch`, the others ``None``."""
    return _worker(int(os.environ["RANK"]), "env://", args)


def summarize_dispatch(args: DispatchBenchmark, out: dict, load_before: float) -> dict:
    """Rank 0's raw result as the summary: medians, their spread (min, max) and ratios, and
    with a link device the bytes that crossed the links per repetition (kernel counters)."""
    per, device = out["per_variant"], out["device"]
    median = {v: statistics.median(per[v]["times"]) for v in VARIANTS}
    cpu = {v: statistics.median(per[v]["cpu_times"]) for v in VARIANTS}
    return {
        "config": {k: v for k, v in asdict(args).items()
                   if k in ("ep", "experts", "topk", "groups", "tokens", "hidden", "ffn",
                            "adjugate_ffn", "iters")},
        "device": f"{device} x {args.ep} ({'nccl' if device.startswith('cuda') else 'gloo'})",
        "load_average": [load_before, os.getloadavg()[0]],
        "copies_per_token": {v: per[v]["copies"] for v in VARIANTS},
        "bytes_per_token": {v: per[v]["bytes"] for v in VARIANTS},
        "adjugate_evals_per_token": {v: per[v]["adjugate_evals"] for v in VARIANTS[1:]},
        "time_s": median,
        "time_spread_s": {v: [min(per[v]["times"]), max(per[v]["times"])] for v in VARIANTS},
        "time_ratio_group_aware_vs_virtual":
            median["group_aware"] / median["alltoall_virtual_adjugates"],
        "time_ratio_group_aware_vs_alltoall": median["group_aware"] / median["alltoall"],
        # CPU seconds (slowest rank, median): less sensitive to a loaded machine than wall time
        "cpu_time_s": cpu,
        "cpu_ratio_group_aware_vs_virtual": cpu["group_aware"] / cpu["alltoall_virtual_adjugates"],
        "cpu_ratio_group_aware_vs_alltoall": cpu["group_aware"] / cpu["alltoall"],
        "time_ratio_hierarchical_vs_group_aware": median["hierarchical"] / median["group_aware"],
        **({"link_bytes": {v: per[v]["link_bytes"] for v in VARIANTS}} if args.link_device
           else {}),
    }


def format_dispatch_table(summary: dict) -> str:
    c = summary["config"]
    lines = [f"EP={c['ep']} E={c['experts']} k={c['topk']} G={c['groups']} "
             f"tokens/rank={c['tokens']} H={c['hidden']} on {summary['device']}",
             f"{'dispatcher':<28} {'copies/token':>12} {'bytes/token':>12} "
             f"{'adjugate evals':>14} {'fwd+bwd s (min..max)':>24} {'CPU s':>7}"]
    for v in VARIANTS:
        adj = summary["adjugate_evals_per_token"].get(v)
        low, high = summary["time_spread_s"][v]
        lines.append(f"{v:<28} {summary['copies_per_token'][v]:>12.3f} "
                     f"{summary['bytes_per_token'][v]:>12.0f} "
                     f"{'-' if adj is None else f'{adj:.3f}':>14} "
                     f"{summary['time_s'][v]:>8.4f} ({low:.3f}..{high:.3f}) "
                     f"{summary['cpu_time_s'][v]:>7.4f}")
    lines.append(f"time ratio group_aware / virtual adjugates: "
                 f"{summary['time_ratio_group_aware_vs_virtual']:.3f} (CPU "
                 f"{summary['cpu_ratio_group_aware_vs_virtual']:.3f}); group_aware / alltoall: "
                 f"{summary['time_ratio_group_aware_vs_alltoall']:.3f} (CPU "
                 f"{summary['cpu_ratio_group_aware_vs_alltoall']:.3f}); load average "
                 f"{summary['load_average'][0]:.1f} -> {summary['load_average'][1]:.1f}")
    return "\n".join(lines)
