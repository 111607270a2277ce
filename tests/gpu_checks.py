"""GPU checks, run by ``tests/test_gpu.py`` in a child process of their own, where Triton
compiles its kernels for real (``TRITON_INTERPRET`` unset) and nothing is patched for CPU.

    python tests/gpu_checks.py kernels     # compiled kernels vs torch references, value + grad
    python tests/gpu_checks.py layer       # the Grove layer on CUDA vs the plain-torch reference

Each prints one JSON object on its last line: per check, the largest error relative to the
reference's scale (``max |x - ref| / max(1, max |ref|)``).
"""

from __future__ import annotations

import json
import sys

import torch


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double().cpu(), expected.double().cpu()
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return (actual - expected).abs().max().item() / scale if expected.numel() else 0.0


def kernels() -> dict[str, float]:
    """Every kernel case of the 33B layer shapes (8192 tokens, EP=8), fp32 and bf16: outputs and
    input gradients of the compiled Triton kernel against its torch reference, on CUDA."""
    from processes import ROOT
    from megatron_grove.benchmarking.kernels import kernel_cases
    from megatron_grove.config import load_config

    cfg = load_config(ROOT / "configs" / "grovemoe_33b_a3b.yaml")
    errors = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (reference, triton_fn, inputs) in kernel_cases(cfg, 8192, 8, dtype).items():
            results = []
            for fn in (reference, triton_fn):
                leaves = [x.detach().clone().requires_grad_(x.is_floating_point())
                          for x in inputs]
                out = fn(*leaves)
                grad_out = torch.ones_like(out)
                grads = torch.autograd.grad(out, [x for x in leaves if x.requires_grad],
                                            grad_out)
                results.append((out.detach(), grads))
            (ref_out, ref_grads), (out, grads) = results
            key = f"{name} {str(dtype).removeprefix('torch.')}"
            errors[key] = max([_relative_error(out, ref_out)]
                              + [_relative_error(g, r) for g, r in zip(grads, ref_grads)])
    return errors


def layer() -> dict[str, float]:
    """The group-aware Grove layer with the Triton backend on CUDA (a one-process NCCL world),
    every test case of ``grove_layer_cases.CASES``: output and gradients against the plain-torch reference
    computed on CPU."""
    from grove_layer_cases import (
        ALL_KEYS,
        build_layer,
        CASES,
        grove_run,
        load_weights,
        reference_of,
    )
    from megatron_grove.runtime import single_process_world

    errors = {}
    with single_process_world(device="cuda"):
        for case in CASES:
            run = grove_run(case, "grove_alltoall", kernels_backend="triton")
            expected, _ = reference_of(run)
            layer_ = build_layer(run, ep=1, device="cuda").cuda()
            load_weights(layer_, run, 0)
            x = run.x.cuda().unsqueeze(1).requires_grad_()
            y, _ = layer_(x)
            (y.squeeze(1) * run.cotangent.cuda()).sum().backward()
            got = {"y": y.detach().squeeze(1), "x_grad": x.grad.squeeze(1),
                   "router": layer_.router.weight.grad,
                   "expert_fc1": torch.stack([e.linear_fc1.weight.grad
                                              for e in layer_.experts.local_experts]),
                   "expert_fc2": torch.stack([e.linear_fc2.weight.grad
                                              for e in layer_.experts.local_experts]),
                   "adjugate_fc1": torch.stack([e.linear_fc1.weight.grad
                                                for e in layer_.adjugate_experts.local_experts]),
                   "adjugate_fc2": torch.stack([e.linear_fc2.weight.grad
                                                for e in layer_.adjugate_experts.local_experts])}
            errors[case.id] = max(_relative_error(got[k], expected[k]) for k in ALL_KEYS)
    return errors


if __name__ == "__main__":
    check = {"kernels": kernels, "layer": layer}[sys.argv[1]]
    print(json.dumps(check()))
