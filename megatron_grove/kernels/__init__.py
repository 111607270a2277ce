"""Triton kernels for the Grove MoE hot paths, each beside its plain-torch reference.

* :mod:`megatron_grove.kernels.swiglu`: SwiGLU activation ``silu(gate) * up`` forward and backward;
* :mod:`megatron_grove.kernels.permute`: token rows -> expert- / group-sorted rows (gather) and back
  (weighted scatter-add), forward and backward;
* :mod:`megatron_grove.kernels.grove_combine`: the Grove combine, the group-weight reduction
  ``lam * sum_{i in S ∩ G_j} rho_i`` fused with the weighted scatter-add of the adjugate
  outputs into the token outputs.

Every public op takes ``backend="torch" | "triton"``: ``torch`` runs the reference (autograd
through torch), ``triton`` runs the kernels through a ``torch.autograd.Function``. The torch
ops work without Triton installed. Triton kernels need CUDA tensors, or CPU tensors with
``TRITON_INTERPRET=1`` set before these modules are first imported (``triton.jit`` reads it at
definition; the tests set it in ``tests/conftest.py``; slow, for checking only).
"""

BACKENDS = ("torch", "triton")

__all__ = ["BACKENDS", "check_backend"]


def check_backend(backend: str) -> None:
    """Raise ``ValueError`` unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend {backend!r}: allowed {', '.join(BACKENDS)}")
