"""SwiGLU activation ``silu(gate) * up`` over Megatron's fused fc1 output, forward and backward.

Layout (Megatron's ``MLP`` with ``gated_linear_unit``): the last dimension of the input holds
``[gate | up]``, each ``F`` wide, so ``x [..., 2F] -> y [..., F]``.

:class:`SwiGLU` is the activation *module* Megatron's ``MLP`` / ``TEGroupedMLP`` build from
``MLPSubmodules.activation_func`` when ``config.use_te_activation_func`` is set (Megatron's
name for "the activation is a module applied to the whole fc1 output"); see
:mod:`megatron_grove.model.layer_spec`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_grove.kernels import check_backend
from megatron_grove.kernels._triton import block_size, check_launchable, jit, tl, triton

__all__ = ["swiglu_reference", "swiglu", "SwiGLU"]


def swiglu_reference(x: torch.Tensor) -> torch.Tensor:
    """Plain torch: ``x [..., 2F] -> silu(x[..., :F]) * x[..., F:]`` ``[..., F]``."""
    gate, up = torch.chunk(x, 2, dim=-1)
    return F.silu(gate) * up


@jit
def _swiglu_fwd_kernel(x_ptr, y_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + row * width + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(x_ptr, dy_ptr, dx_ptr, width, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    gate = tl.load(x_ptr + row * 2 * width + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * 2 * width + width + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * width + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * (sig + silu * (1.0 - sig))
    dup = dy * silu
    out_ty = dx_ptr.dtype.element_ty
    tl.store(dx_ptr + row * 2 * width + cols, dgate.to(out_ty), mask=mask)
    tl.store(dx_ptr + row * 2 * width + width + cols, dup.to(out_ty), mask=mask)


def _grid(rows: int, width: int, block: int) -> tuple[int, int]:
    return rows, triton.cdiv(width, block)


class _SwiGLUFunction(torch.autograd.Function):
    """Triton SwiGLU; saves only the input (the backward recomputes the sigmoid)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        check_launchable(x)
        x2 = x.contiguous().reshape(-1, x.shape[-1])
        width = x2.shape[1] // 2
        y = torch.empty(x2.shape[0], width, dtype=x.dtype, device=x.device)
        if y.numel():
            block = block_size(width)
            _swiglu_fwd_kernel[_grid(x2.shape[0], width, block)](x2, y, width, BLOCK=block)
        ctx.save_for_backward(x2)
        ctx.input_shape = x.shape
        return y.reshape(*x.shape[:-1], width)

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> torch.Tensor:
        (x2,) = ctx.saved_tensors
        width = x2.shape[1] // 2
        dy2 = dy.contiguous().reshape(-1, width)
        dx = torch.empty_like(x2)
        if dx.numel():
            block = block_size(width)
            _swiglu_bwd_kernel[_grid(x2.shape[0], width, block)](x2, dy2, dx, width, BLOCK=block)
        return dx.reshape(ctx.input_shape)


def swiglu(x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """``x [..., 2F]`` (``[gate | up]``) -> ``silu(gate) * up`` ``[..., F]``."""
    check_backend(backend)
    if x.shape[-1] % 2:
        raise ValueError(f"swiglu: last dimension {x.shape[-1]} must be even ([gate | up])")
    return _SwiGLUFunction.apply(x) if backend == "triton" else swiglu_reference(x)


class SwiGLU(torch.nn.Module):
    """SwiGLU as Megatron's MLP activation module: ``SwiGLU(config=...)`` (Megatron's
    ``TEActivationFunctionBuilder`` protocol), ``forward(x [..., 2F]) -> [..., F]``.
    The backend is ``config.grove_kernels_backend``."""

    def __init__(self, *, config, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend or config.grove_kernels_backend
        check_backend(self.backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"
