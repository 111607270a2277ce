"""Dispatch benchmark: the same routed tokens through three MoE layers on ``--ep`` processes.

    (a) ``alltoall``:                  Megatron's MoELayer + all-to-all, routed experts only;
    (b) ``alltoall_virtual_adjugates``: GroveMoELayer, adjugates as extra experts of Megatron's
                                        all-to-all (one row per (token, expert) and (token, group));
    (c) ``group_aware``:               GroveMoELayer on GroupAwareAlltoAllDispatcher (one row per
                                        (token, EP rank)).

Each of the ``--ep`` processes (gloo on CPU, NCCL with one GPU each when CUDA is available)
routes ``--tokens`` tokens uniformly at random (top-k of random scores, the same for all three
layers: the router is bypassed) and times forward + backward of each layer (median over
``--iters``, slowest rank). A *copy* is one token row the dispatcher sends to another rank or
keeps locally for an expert (what enters the dispatch all-to-all); bytes are those of the rows
and their routing weights in the dispatch direction (the combine sends the rows back).

    python benchmarks/dispatch.py --ep 4 --experts 128 --topk 8 --groups 64 --tokens 4096 \\
        --hidden 512 [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = ("alltoall", "alltoall_virtual_adjugates", "group_aware")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare Megatron's all-to-all (experts only; adjugates as extra experts) "
                    "with the group-aware dispatcher on the same routed tokens.")
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
    args.ffn = args.ffn or max(1, 3 * args.hidden // 8)
    args.adjugate_ffn = args.adjugate_ffn or max(1, args.hidden // 16)
    problems = []
    if args.ep < 1 or args.experts % args.ep:
        problems.append(f"--ep {args.ep} must divide --experts {args.experts}")
    if args.groups < 1 or args.experts % args.groups or args.groups % args.ep:
        problems.append(f"--groups {args.groups} must divide --experts {args.experts} and be a "
                        f"multiple of --ep {args.ep}")
    if not 1 <= args.topk <= args.experts:
        problems.append(f"--topk {args.topk} must be in 1..{args.experts}")
    if args.device == "cuda" and torch.cuda.device_count() < args.ep:
        problems.append(f"--device cuda needs {args.ep} GPUs, found {torch.cuda.device_count()}")
    if problems:
        parser.error("; ".join(problems))
    return args


def _layer_config(args: argparse.Namespace, group_aware: bool, grove: bool):
    import torch.nn.functional as F
    from megatron_grove.megatron_config import GroveTransformerConfig

    return GroveTransformerConfig(
        num_layers=1, hidden_size=args.hidden, num_attention_heads=1, ffn_hidden_size=args.ffn,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=True, expert_model_parallel_size=args.ep,
        num_moe_experts=args.experts, moe_ffn_hidden_size=args.ffn, moe_router_topk=args.topk,
        moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_token_dispatcher_type="alltoall", moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_num_expert_groups=args.groups if grove else 0,
        moe_adjugate_ffn_hidden_size=args.adjugate_ffn, moe_adjugate_scale=args.adjugate_scale,
        moe_bias_update_rule="none", moe_group_aware_dispatch=group_aware)


def _build_layer(args: argparse.Namespace, variant: str, device: torch.device):
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron_grove.grove_layer import GroveMoELayer
    from megatron_grove.router import GroveTopKRouter

    submodules = dataclasses.replace(
        get_moe_module_spec(use_te=False, num_experts=args.experts).keywords["submodules"],
        router=GroveTopKRouter)
    if variant == "alltoall":
        layer = MoELayer(_layer_config(args, False, grove=False), submodules=submodules)
    else:
        layer = GroveMoELayer(_layer_config(args, variant == "group_aware", grove=True),
                              submodules=submodules)
    return layer.to(device)


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


def _uniform_routing(args, rank: int, device: torch.device):
    """``probs [T, E]`` (softmax over the selection, 0 elsewhere) and ``routing_map [T, E]``."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)
    scores = torch.rand(args.tokens, args.experts, generator=gen)
    chosen = scores.topk(args.topk).indices
    routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)
    logits = torch.randn(args.tokens, args.experts, generator=gen)
    probs = torch.softmax(logits.masked_fill(~routing_map, float("-inf")), dim=-1)
    x = torch.randn(args.tokens, 1, args.hidden, generator=gen)
    return probs.to(device), routing_map.to(device), x.to(device)


def _worker(rank: int, args: argparse.Namespace, init_file: str, queue) -> None:
    import torch.distributed as dist
    from megatron_grove.moe_stats import reset_moe_counters
    from megatron_grove.runtime import destroy_parallel, initialize_parallel

    try:
        os.environ["LOCAL_RANK"] = str(rank)
        runtime = initialize_parallel(expert_parallel=args.ep, device=args.device,
                                      init_method=f"file://{init_file}", rank=rank,
                                      world_size=args.ep, timeout_s=600)
        device = runtime.device
        if device.type == "cpu":  # share the cores between the processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.ep))
        probs, routing_map, x = _uniform_routing(args, rank, device)
        result = {}
        for variant in VARIANTS:
            layer = _build_layer(args, variant, device)
            router_probs = probs.clone().requires_grad_()
            layer.route = lambda hidden_states, padding_mask=None: (router_probs, routing_map)
            meter = _DispatchMeter(layer)
            times = []
            for it in range(args.warmup + args.iters):
                if it == args.warmup:
                    meter.rows = meter.bytes = 0
                    reset_moe_counters(layer)
                inp = x.clone().requires_grad_()
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                y, _ = layer(inp)
                y.backward(torch.ones_like(y))
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = torch.tensor([time.perf_counter() - began], dtype=torch.float64)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
                if it >= args.warmup:
                    times.append(float(elapsed))
            adjugate_rows = getattr(layer, "grove_counters", {}).get("adjugate_rows", 0)
            totals = torch.tensor([meter.rows, meter.bytes, adjugate_rows], dtype=torch.float64)
            dist.all_reduce(totals)
            tokens = args.tokens * args.ep * args.iters
            result[variant] = {"copies": float(totals[0]) / tokens,
                               "bytes": float(totals[1]) / tokens,
                               "adjugate_evals": float(totals[2]) / tokens,
                               "time_s": statistics.median(times)}
            del layer
        if rank == 0:
            queue.put(("ok", result, str(device)))
        destroy_parallel()
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        import traceback
        queue.put(("error", f"rank {rank}: {exc}\n{traceback.format_exc()}", None))


def run_benchmark(args: argparse.Namespace) -> dict:
    """Spawn ``args.ep`` processes, run the three layers, return the summary."""
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.device_count() >= args.ep else "cpu"
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_worker, args=(r, args, os.path.join(tmp, "init"), queue))
                 for r in range(args.ep)]
        for p in procs:
            p.start()
        status, payload, device = queue.get()
        for p in procs:
            p.join(timeout=60 if status == "ok" else 5)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(payload)
    per = payload
    return {
        "config": {k: getattr(args, k) for k in ("ep", "experts", "topk", "groups", "tokens",
                                                 "hidden", "ffn", "adjugate_ffn", "iters")},
        "device": f"{device} x {args.ep} ({'nccl' if device.startswith('cuda') else 'gloo'})",
        "copies_per_token": {v: per[v]["copies"] for v in VARIANTS},
        "bytes_per_token": {v: per[v]["bytes"] for v in VARIANTS},
        "adjugate_evals_per_token": {v: per[v]["adjugate_evals"] for v in VARIANTS[1:]},
        "time_s": {v: per[v]["time_s"] for v in VARIANTS},
        "time_ratio_group_aware_vs_virtual":
            per["group_aware"]["time_s"] / per["alltoall_virtual_adjugates"]["time_s"],
        "time_ratio_group_aware_vs_alltoall":
            per["group_aware"]["time_s"] / per["alltoall"]["time_s"],
    }


def format_table(summary: dict) -> str:
    c = summary["config"]
    lines = [f"EP={c['ep']} E={c['experts']} k={c['topk']} G={c['groups']} "
             f"tokens/rank={c['tokens']} H={c['hidden']} on {summary['device']}",
             f"{'dispatcher':<28} {'copies/token':>12} {'bytes/token':>12} "
             f"{'adjugate evals':>14} {'fwd+bwd s':>10}"]
    for v in VARIANTS:
        adj = summary["adjugate_evals_per_token"].get(v)
        lines.append(f"{v:<28} {summary['copies_per_token'][v]:>12.3f} "
                     f"{summary['bytes_per_token'][v]:>12.0f} "
                     f"{'-' if adj is None else f'{adj:.3f}':>14} {summary['time_s'][v]:>10.4f}")
    lines.append(f"time ratio group_aware / virtual adjugates: "
                 f"{summary['time_ratio_group_aware_vs_virtual']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary = run_benchmark(args)
    print(json.dumps(summary) if args.json else format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
