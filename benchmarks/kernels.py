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
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _cases(cfg, tokens: int, ep: int, dtype: torch.dtype, device: str = "cuda"):
    """``name -> (reference_fn, triton_fn, inputs)`` at the layer's shapes on one EP rank
    (``device`` other than cuda: for the tests, under Triton's interpreter)."""
    from kernels.grove_combine import grove_combine, grove_combine_reference
    from kernels.permute import permute, permute_reference, sorted_rows, unpermute, unpermute_reference
    from kernels.swiglu import swiglu, swiglu_reference

    m, e = cfg.model, cfg.moe
    hidden, experts, groups, topk = m.hidden_size, e.num_experts, e.num_expert_groups, e.router_topk
    per_group, local_experts = experts // groups, experts // ep
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    chosen = torch.rand(tokens, experts, device=dev, generator=gen).topk(topk, dim=-1).indices
    routing_map = torch.zeros(tokens, experts, dtype=torch.bool, device=dev)
    routing_map.scatter_(1, chosen, True)
    local_map = routing_map[:, :local_experts]  # the tokens rank 0 receives rows for
    local_map = local_map[local_map.any(dim=-1)]
    received = local_map.shape[0]
    probs = torch.rand(local_map.shape, device=dev, dtype=dtype, generator=gen) * local_map
    row_token = sorted_rows(local_map)[0]
    group_hit = local_map.reshape(received, -1, per_group).any(dim=-1)
    adj_token, adj_group, _ = sorted_rows(group_hit)
    rows = row_token.shape[0]

    def rand(*shape):
        return torch.randn(*shape, device=dev, dtype=dtype, generator=gen)

    return {
        f"swiglu experts [{rows}, 2x{e.ffn_hidden_size}]": (
            swiglu_reference, lambda x: swiglu(x, "triton"), [rand(rows, 2 * e.ffn_hidden_size)]),
        f"swiglu adjugates [{adj_token.shape[0]}, 2x{e.adjugate_ffn_hidden_size}]": (
            swiglu_reference, lambda x: swiglu(x, "triton"),
            [rand(adj_token.shape[0], 2 * e.adjugate_ffn_hidden_size)]),
        f"permute [{received}, {hidden}] -> [{rows}]": (
            lambda x: permute_reference(x, row_token), lambda x: permute(x, row_token, "triton"),
            [rand(received, hidden)]),
        f"unpermute [{rows}, {hidden}] -> [{received}] weighted": (
            lambda y, w: unpermute_reference(y, row_token, w, received),
            lambda y, w: unpermute(y, row_token, w, received, "triton"),
            [rand(rows, hidden), rand(rows)]),
        f"grove_combine [{adj_token.shape[0]}, {hidden}] -> [{received}]": (
            lambda a, p, b: grove_combine_reference(a, adj_token, adj_group, p, per_group,
                                                    e.adjugate_scale, b),
            lambda a, p, b: grove_combine(a, adj_token, adj_group, p, per_group,
                                          e.adjugate_scale, b, "triton"),
            [rand(adj_token.shape[0], hidden), probs.clone(), rand(received, hidden)]),
    }


def _passes(fn, inputs):
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    out = fn(*leaves)
    grad = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            fn(*inputs)

    def forward_backward():
        torch.autograd.grad(fn(*leaves), leaves, grad)

    return {"forward": forward, "forward+backward": forward_backward}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (none found): nothing measured. The "
              "kernels' correctness tests run on CPU: pytest tests/test_kernels.py")
        return 0
    from megatron_grove.config import ConfigError, load_config
    from megatron_grove.megatron_config import TORCH_DTYPES

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"kernels.py: config error: {exc}", file=sys.stderr)
        return 2
    if not cfg.moe.num_expert_groups or cfg.moe.num_expert_groups % args.ep:
        print(f"kernels.py: --ep {args.ep} must divide moe.num_expert_groups="
              f"{cfg.moe.num_expert_groups} (> 0)", file=sys.stderr)
        return 2
    dtype = TORCH_DTYPES[args.dtype]
    print(f"{torch.cuda.get_device_name()}; {args.config}; {args.tokens} tokens, EP={args.ep}, "
          f"{args.dtype}; median of {args.repeats} (ms)")
    print(f"{'kernel':58s} {'pass':17s} {'eager':>8s} {'compile':>8s} {'triton':>8s} "
          f"{'vs eager':>8s}")
    results = []
    for name, (reference, triton_fn, inputs) in _cases(cfg, args.tokens, args.ep, dtype).items():
        compiled = torch.compile(reference, dynamic=False)
        timings = {label: _passes(fn, inputs) for label, fn in
                   (("eager", reference), ("compile", compiled), ("triton", triton_fn))}
        for pass_name in ("forward", "forward+backward"):
            ms = {label: _median_ms(timings[label][pass_name], args.repeats)
                  for label in timings}
            results.append({"kernel": name, "pass": pass_name, **ms})
            print(f"{name:58s} {pass_name:17s} {ms['eager']:8.3f} {ms['compile']:8.3f} "
                  f"{ms['triton']:8.3f} {ms['eager'] / ms['triton']:7.2f}x", flush=True)
    if args.json:
        path = Path(args.json)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
        tmp.replace(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
