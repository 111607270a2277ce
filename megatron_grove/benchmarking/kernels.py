"""The kernel benchmark: each Triton kernel against its eager torch reference and
``torch.compile`` of it, at the shapes of a config's MoE layer on one EP rank (CUDA only).

Routing is uniform at random, so each kernel sees the row counts of a balanced layer. Per
kernel and pass (forward, forward+backward): median milliseconds of eager torch,
``torch.compile`` and Triton. :func:`kernel_cases` also serves the tests, on CPU under Triton's
interpreter.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch

from megatron_grove.config import GroveConfig

__all__ = ["kernel_cases", "time_kernels"]


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


def kernel_cases(cfg: GroveConfig, tokens: int, ep: int, dtype: torch.dtype,
                 device: str = "cuda") -> dict:
    """``name -> (reference_fn, triton_fn, inputs)`` at the layer's shapes on one EP rank
    (``device`` other than cuda: for the tests, under Triton's interpreter)."""
    from megatron_grove.kernels.grove_combine import grove_combine, grove_combine_reference
    from megatron_grove.kernels.permute import (
        permute,
        permute_reference,
        sorted_rows,
        unpermute,
        unpermute_reference,
    )
    from megatron_grove.kernels.swiglu import swiglu, swiglu_reference

    m, e = cfg.model, cfg.moe
    hidden, experts, topk = m.hidden_size, e.num_experts, e.router_topk
    per_group, local_experts = e.experts_per_group, experts // ep
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




def time_kernels(cfg: GroveConfig, tokens: int, ep: int, dtype: torch.dtype, repeats: int,
                 report: Callable[[dict], None] = lambda row: None) -> list[dict]:
    """Time every kernel case on the current CUDA device; one row per (kernel, pass):
    ``{"kernel", "pass", "eager", "compile", "triton"}`` (median ms), each also handed to
    ``report`` as soon as it is measured."""
    results = []
    for name, (reference, triton_fn, inputs) in kernel_cases(cfg, tokens, ep, dtype).items():
        compiled = torch.compile(reference, dynamic=False)
        timings = {label: _passes(fn, inputs) for label, fn in
                   (("eager", reference), ("compile", compiled), ("triton", triton_fn))}
        for pass_name in ("forward", "forward+backward"):
            ms = {label: _median_ms(timings[label][pass_name], repeats) for label in timings}
            row = {"kernel": name, "pass": pass_name, **ms}
            results.append(row)
            report(row)
    return results
