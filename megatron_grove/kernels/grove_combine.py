"""The Grove combine: group-weight reduction fused with the adjugate scatter-add.

On an EP rank, for the ``N`` received token rows with routing weights ``probs [N, E_l]`` over
the rank's ``E_l = G_l * n`` experts (zero off the selection; group ``g`` = columns
``g*n .. g*n+n-1``), and the adjugate outputs of the (token, group) pairs, one row each::

    adjugate_out [R, H]   # A_g(x_t) for row r = (t, g), typically group-sorted
    row_token    [R]      # t
    row_group    [R]      # g (local group index)

the combine adds each adjugate output, weighted by ``lam`` times its group's routing weight,
into the token's output::

    out[t] = base[t] + lam * sum_{r: row_token[r] = t} (sum_{i < n} probs[t, g_r*n + i]) adjugate_out[r]

``base [N, H]`` is the routed experts' partial sum (or None for zeros). The Triton kernel reads
the ``n`` weights of the row's group and scales the row in one pass (no ``[R]`` weight tensor in
memory); its backward gives ``d adjugate_out[r] = lam w_r dout[t]`` and, for every column of
group ``g_r``, ``d probs[t, .] = lam <dout[t], adjugate_out[r]>``. Each (token, group) pair
must appear at most once (the adjugate runs once per pair).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_grove.kernels import check_backend
from megatron_grove.kernels._triton import block_size, check_launchable, jit, tl, triton

__all__ = ["group_weights", "grove_combine_reference", "grove_combine"]


def group_weights(probs: torch.Tensor, row_token: torch.Tensor, row_group: torch.Tensor,
                  experts_per_group: int) -> torch.Tensor:
    """``probs [N, G_l*n]`` -> per-row group weight ``sum_{i<n} probs[t_r, g_r*n+i]`` ``[R]``."""
    num_tokens, num_experts = probs.shape
    per_group = probs.reshape(num_tokens, num_experts // experts_per_group,
                              experts_per_group).sum(dim=-1)
    return per_group[row_token, row_group]


def grove_combine_reference(adjugate_out: torch.Tensor, row_token: torch.Tensor,
                            row_group: torch.Tensor, probs: torch.Tensor, experts_per_group: int,
                            scale: float, base: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Plain torch: ``adjugate_out [R, H]`` -> ``out [N, H]`` (see the module docstring)."""
    weights = scale * group_weights(probs, row_token, row_group, experts_per_group)
    out = base if base is not None else adjugate_out.new_zeros(probs.shape[0],
                                                               adjugate_out.shape[1])
    return out.index_add(0, row_token, adjugate_out * weights.unsqueeze(-1).to(out.dtype))


@jit
def _combine_fwd_kernel(adj_ptr, token_ptr, group_ptr, probs_ptr, out_ptr, width, num_experts,
                        scale, N_PER_GROUP: tl.constexpr, GROUP_BLOCK: tl.constexpr,
                        BLOCK: tl.constexpr):
    """``out[t_r] += scale * sum(probs[t_r, group g_r]) * adj[r]``; grid ``(R, cdiv(H, BLOCK))``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    token = tl.load(token_ptr + row).to(tl.int64)
    group = tl.load(group_ptr + row).to(tl.int64)
    members = tl.arange(0, GROUP_BLOCK)
    rho = tl.load(probs_ptr + token * num_experts + group * N_PER_GROUP + members,
                  mask=members < N_PER_GROUP, other=0.0).to(tl.float32)
    weight = scale * tl.sum(rho, axis=0)
    adj = tl.load(adj_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + token * width + cols, weight * adj, mask=mask)


@jit
def _combine_bwd_kernel(dout_ptr, adj_ptr, token_ptr, group_ptr, probs_ptr, dadj_ptr,
                        dprobs_ptr, width, num_experts, scale, N_PER_GROUP: tl.constexpr,
                        GROUP_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """``dadj[r] = scale w_r dout[t_r]``; ``dprobs[t_r, group g_r] = scale <dout[t_r], adj[r]>``;
    grid ``(R,)``."""
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(token_ptr + row).to(tl.int64)
    group = tl.load(group_ptr + row).to(tl.int64)
    members = tl.arange(0, GROUP_BLOCK)
    member_mask = members < N_PER_GROUP
    prob_offsets = token * num_experts + group * N_PER_GROUP + members
    rho = tl.load(probs_ptr + prob_offsets, mask=member_mask, other=0.0).to(tl.float32)
    weight = scale * tl.sum(rho, axis=0)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        dout = tl.load(dout_ptr + token * width + cols, mask=mask, other=0.0).to(tl.float32)
        adj = tl.load(adj_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dadj_ptr + row * width + cols, (weight * dout).to(dadj_ptr.dtype.element_ty),
                 mask=mask)
        dot += dout * adj
    dweight = scale * tl.sum(dot, axis=0)
    tl.store(dprobs_ptr + prob_offsets, tl.zeros([GROUP_BLOCK], dtype=tl.float32) + dweight,
             mask=member_mask)


class _GroveCombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, adjugate_out, row_token, row_group, probs, experts_per_group, scale, base):
        check_launchable(adjugate_out, row_token, row_group, probs)
        adjugate_out, probs = adjugate_out.contiguous(), probs.contiguous()
        row_token, row_group = row_token.contiguous(), row_group.contiguous()
        num_tokens, width = probs.shape[0], adjugate_out.shape[1]
        out = (base.to(torch.float32, copy=True) if base is not None else
               torch.zeros(num_tokens, width, dtype=torch.float32, device=adjugate_out.device))
        rows = adjugate_out.shape[0]
        ctx.meta = (experts_per_group, scale, base is not None,
                    base.dtype if base is not None else adjugate_out.dtype)
        ctx.save_for_backward(adjugate_out, row_token, row_group, probs)
        if rows and width:
            block = block_size(width)
            _combine_fwd_kernel[(rows, triton.cdiv(width, block))](
                adjugate_out, row_token, row_group, probs, out, width, probs.shape[1],
                float(scale), N_PER_GROUP=experts_per_group,
                GROUP_BLOCK=block_size(experts_per_group, cap=1 << 16), BLOCK=block)
        return out.to(ctx.meta[3])

    @staticmethod
    def backward(ctx, dout):
        adjugate_out, row_token, row_group, probs = ctx.saved_tensors
        experts_per_group, scale, has_base, _ = ctx.meta
        dout = dout.contiguous()
        dadj = torch.empty_like(adjugate_out)
        dprobs = torch.zeros(probs.shape, dtype=torch.float32, device=probs.device)
        rows, width = adjugate_out.shape
        if rows:
            _combine_bwd_kernel[(rows,)](
                dout, adjugate_out, row_token, row_group, probs, dadj, dprobs, width,
                probs.shape[1], float(scale), N_PER_GROUP=experts_per_group,
                GROUP_BLOCK=block_size(experts_per_group, cap=1 << 16),
                BLOCK=block_size(width))
        return (dadj, None, None, dprobs.to(probs.dtype), None, None,
                dout if has_base else None)


def grove_combine(adjugate_out: torch.Tensor, row_token: torch.Tensor, row_group: torch.Tensor,
                  probs: torch.Tensor, experts_per_group: int, scale: float,
                  base: Optional[torch.Tensor] = None, backend: str = "torch") -> torch.Tensor:
    """``adjugate_out [R, H]``, ``row_token [R]``, ``row_group [R]``, ``probs [N, G_l*n]``,
    ``base [N, H]`` or None -> ``out [N, H]`` (see the module docstring)."""
    check_backend(backend)
    if probs.shape[1] % experts_per_group:
        raise ValueError(f"grove_combine: probs has {probs.shape[1]} expert columns, not a "
                         f"multiple of experts_per_group={experts_per_group}")
    if backend == "triton":
        return _GroveCombineFunction.apply(adjugate_out, row_token, row_group, probs,
                                           experts_per_group, scale, base)
    return grove_combine_reference(adjugate_out, row_token, row_group, probs, experts_per_group,
                                   scale, base)
