"""Permute / unpermute for the deduplicated dispatch: token rows <-> expert- or group-sorted rows.

On an EP rank, each received token is one row of ``x [N, H]``. Its (token, expert) and
(token, group) work items are rows of a sorted copy, described by one index tensor::

    row_token [R] int64   # the token row each sorted row comes from / returns to

* :func:`permute`: ``x [N, H] -> x[row_token] [R, H]`` (gather); backward: scatter-add.
* :func:`unpermute`: ``y [R, H] -> out [N, H]``, ``out[t] = sum_{r: row_token[r] = t} w_r y[r]``
  (weighted scatter-add, ``w [R]`` or None for 1); backward: ``dy[r] = w_r dout[row_token[r]]``
  and ``dw[r] = <dout[row_token[r]], y[r]>``.

The index tensors come from :func:`sorted_rows` (``routing_map [N, K]`` bool -> rows sorted by
column, then token; columns are experts, or groups for the adjugates).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_grove.kernels import check_backend
from megatron_grove.kernels._triton import block_size, check_launchable, jit, tl, triton

__all__ = ["sorted_rows", "permute_reference", "unpermute_reference", "permute", "unpermute"]


def sorted_rows(routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``routing_map [N, K]`` bool -> ``(row_token [R], row_column [R], rows_per_column [K])``,
    the ``R = routing_map.sum()`` selected (token, column) pairs sorted by column, then token."""
    column, token = routing_map.t().nonzero(as_tuple=True)
    return token, column, routing_map.sum(dim=0)


def permute_reference(x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``x [N, H]``, ``row_token [R]`` -> ``[R, H]``."""
    return x.index_select(0, row_token)


def unpermute_reference(y: torch.Tensor, row_token: torch.Tensor, weights: Optional[torch.Tensor],
                        num_tokens: int) -> torch.Tensor:
    """Plain torch: ``y [R, H]``, ``row_token [R]``, ``weights [R]`` or None -> ``[N, H]``."""
    if weights is not None:
        y = y * weights.unsqueeze(-1).to(y.dtype)
    out = torch.zeros(num_tokens, y.shape[1], dtype=y.dtype, device=y.device)
    return out.index_add_(0, row_token, y)


@jit
def _gather_kernel(src_ptr, index_ptr, out_ptr, width, BLOCK: tl.constexpr):
    """``out[r] = src[index[r]]``; grid ``(R, cdiv(H, BLOCK))``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    src_row = tl.load(index_ptr + row).to(tl.int64)
    values = tl.load(src_ptr + src_row * width + cols, mask=mask)
    tl.store(out_ptr + row * width + cols, values, mask=mask)


@jit
def _scatter_add_kernel(src_ptr, index_ptr, weight_ptr, out_ptr, width,
                        HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """``out[index[r]] += w[r] * src[r]`` (fp32 atomics); grid ``(R, cdiv(H, BLOCK))``."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    dst_row = tl.load(index_ptr + row).to(tl.int64)
    values = tl.load(src_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        values = values * tl.load(weight_ptr + row).to(tl.float32)
    tl.atomic_add(out_ptr + dst_row * width + cols, values, mask=mask)


@jit
def _unpermute_bwd_kernel(dout_ptr, index_ptr, y_ptr, weight_ptr, dy_ptr, dw_ptr, width,
                          HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr):
    """``dy[r] = w[r] dout[index[r]]``, ``dw[r] = <dout[index[r]], y[r]>``; grid ``(R,)``."""
    row = tl.program_id(0).to(tl.int64)
    token = tl.load(index_ptr + row).to(tl.int64)
    weight = tl.load(weight_ptr + row).to(tl.float32) if HAS_WEIGHT else 1.0
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < width
        dout = tl.load(dout_ptr + token * width + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dy_ptr + row * width + cols, (weight * dout).to(dy_ptr.dtype.element_ty),
                 mask=mask)
        if HAS_WEIGHT:
            y = tl.load(y_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
            dot += dout * y
    if HAS_WEIGHT:
        tl.store(dw_ptr + row, tl.sum(dot, axis=0))


def _gather(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    out = torch.empty(index.shape[0], src.shape[1], dtype=src.dtype, device=src.device)
    if out.numel():
        block = block_size(src.shape[1])
        _gather_kernel[(index.shape[0], triton.cdiv(src.shape[1], block))](
            src, index, out, src.shape[1], BLOCK=block)
    return out


def _scatter_add(src: torch.Tensor, index: torch.Tensor, weights: Optional[torch.Tensor],
                 num_rows: int) -> torch.Tensor:
    """fp32 accumulation, returned in ``src``'s dtype."""
    out = torch.zeros(num_rows, src.shape[1], dtype=torch.float32, device=src.device)
    if src.numel():
        block = block_size(src.shape[1])
        _scatter_add_kernel[(index.shape[0], triton.cdiv(src.shape[1], block))](
            src, index, weights if weights is not None else src, out, src.shape[1],
            HAS_WEIGHT=weights is not None, BLOCK=block)
    return out.to(src.dtype)


class _PermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, row_token: torch.Tensor) -> torch.Tensor:
        check_launchable(x, row_token)
        ctx.save_for_backward(row_token)
        ctx.num_tokens = x.shape[0]
        return _gather(x.contiguous(), row_token.contiguous())

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        (row_token,) = ctx.saved_tensors
        return _scatter_add(dy.contiguous(), row_token, None, ctx.num_tokens), None


class _UnpermuteFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: torch.Tensor, row_token: torch.Tensor, weights: Optional[torch.Tensor],
                num_tokens: int) -> torch.Tensor:
        check_launchable(y, row_token)
        y, row_token = y.contiguous(), row_token.contiguous()
        weights = weights.contiguous() if weights is not None else None
        ctx.save_for_backward(y, row_token, weights)
        return _scatter_add(y, row_token, weights, num_tokens)

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        y, row_token, weights = ctx.saved_tensors
        dout = dout.contiguous()
        width = y.shape[1]
        dy = torch.empty_like(y)
        dw = (torch.empty(y.shape[0], dtype=torch.float32, device=y.device)
              if weights is not None else None)
        if y.numel():
            _unpermute_bwd_kernel[(y.shape[0],)](
                dout, row_token, y, weights if weights is not None else y, dy,
                dw if dw is not None else dy, width, HAS_WEIGHT=weights is not None,
                BLOCK=block_size(width))
        return dy, None, (dw.to(weights.dtype) if dw is not None else None), None


def permute(x: torch.Tensor, row_token: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Token rows -> sorted rows: ``x [N, H]``, ``row_token [R]`` -> ``x[row_token]`` ``[R, H]``."""
    check_backend(backend)
    if backend == "triton":
        return _PermuteFunction.apply(x, row_token)
    return permute_reference(x, row_token)


def unpermute(y: torch.Tensor, row_token: torch.Tensor, weights: Optional[torch.Tensor],
              num_tokens: int, backend: str = "torch") -> torch.Tensor:
    """Sorted rows -> token rows: ``y [R, H]``, ``row_token [R]``, ``weights [R]`` or None ->
    ``out [num_tokens, H]`` with ``out[t] = sum_{r: row_token[r] = t} w_r y[r]``."""
    check_backend(backend)
    if backend == "triton":
        return _UnpermuteFunction.apply(y, row_token, weights, num_tokens)
    return unpermute_reference(y, row_token, weights, num_tokens)
