"""What the kernel modules share: the optional Triton import and launch checks."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch backend needs no Triton
    triton = tl = None

__all__ = ["triton", "tl", "jit", "block_size", "check_launchable"]


def jit(fn):
    """``triton.jit`` when Triton is installed; otherwise the function stays a plain
    (never launched) function, so the modules import without Triton."""
    return triton.jit(fn) if triton is not None else fn


def block_size(width: int, cap: int = 1024) -> int:
    """Power-of-two block covering ``width`` columns, between 16 and ``cap``."""
    return max(16, min(cap, 1 << max(0, (width - 1).bit_length())))


def check_launchable(*tensors: torch.Tensor) -> None:
    """Raise a clear error where a Triton launch cannot work."""
    if triton is None:
        raise RuntimeError("kernel backend 'triton' needs the triton package (pip install triton)")
    if any(t.device.type == "cpu" for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 set before "
                           "kernels are imported (slow, for tests); on a GPU pass CUDA tensors")
