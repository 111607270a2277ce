"""``BatchedSequentialMLP``: Megatron's ``SequentialMLP`` (the same expert MLP modules,
parameters, initialisation and sharded checkpoints) whose forward runs all local experts as one
grouped matrix product on CPU instead of a Python loop over them.

The Grove layer's adjugate bank holds ``G/ep`` small experts of one shape (the 33B recipe: 8
adjugates of FFN 128 per rank at EP=8; 32 of FFN 8 in the CPU benchmark's 33B-shaped MoE).
Megatron's local spec runs them one by one, ~30 operations each forward and backward, which on
CPU costs more than their arithmetic. Here the rows, already sorted by expert
(``tokens_per_expert`` of them each), go through torch's grouped GEMM
(``torch.nn.functional.grouped_mm``, offsets = the experts' last rows) with the experts' weights
stacked::

    h = grouped_mm(x [N, H], W1^T [n, H, 2f]);  a = silu(gate) * up * probs
    y = grouped_mm(a [N, f], W2^T [n, f, H])                       [N, H]

No padding and no copy of the rows; each row meets exactly the products Megatron's MLP computes
(its outputs and gradients equal the loop's, tested). Gradients reach each expert's own
``linear_fc1`` / ``linear_fc2`` weight through the stack. Megatron's loop runs instead on a GPU
(where the bank is TE's grouped ``TEGroupedMLP`` with TransformerEngine) and wherever the
grouped product would compute something else: biases, another activation or activation module
(the Triton SwiGLU), a clamp or offset on the GLU, FP8/FP4, probs applied on the input, expert
tensor parallelism, fused or delayed weight-gradient accumulation, a single expert.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

__all__ = ["BatchedSequentialMLP", "batched_experts_builder"]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (the grouped GEMM's backward
    refuses strided ones, e.g. the expanded gradient of a ``sum``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


class BatchedSequentialMLP(SequentialMLP):
    """``forward(rows [N, H] sorted by expert, tokens_per_expert [n] (CPU), probs [N]) ->
    (out [N, H], None)``, as Megatron's ``SequentialMLP`` (module docstring)."""

    def _batched(self, x: torch.Tensor) -> bool:
        c = self.config
        ffn = self.local_experts[0].linear_fc2.weight.shape[1]
        aligned = all(d * x.element_size() % 16 == 0 for d in (x.shape[-1], ffn))
        return (x.device.type == "cpu" and aligned and self.num_local_experts > 1
                and c.gated_linear_unit
                and c.activation_func is F.silu and not c.add_bias_linear
                and not c.use_te_activation_func and not c.bias_activation_fusion
                and c.activation_func_clamp_value is None and c.glu_linear_offset == 0.0
                and not c.fp8 and not c.fp4 and not c.moe_apply_probs_on_input
                and not c.gradient_accumulation_fusion and not c.delay_wgrad_compute
                and self.tp_group.size() == 1)

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self._batched(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        offsets = torch.cumsum(tokens_per_expert, 0).to(dtype=torch.int32)
        w1 = torch.stack([e.linear_fc1.weight.t() for e in self.local_experts])  # [n, H, 2f]
        w2 = torch.stack([e.linear_fc2.weight.t() for e in self.local_experts])  # [n, f, H]
        gate, up = F.grouped_mm(x.contiguous(), w1, offs=offsets).chunk(2, dim=-1)
        glu = F.silu(gate) * up  # Megatron's MLP: glu, the per-token scale, the glu's dtype
        act = (glu * permuted_probs.unsqueeze(-1)).to(glu.dtype)
        out = F.grouped_mm(act, w2, offs=offsets)
        return _ContiguousGrad.apply(out), None


def batched_experts_builder(builder: functools.partial) -> functools.partial:
    """A layer spec's experts builder (``partial(SequentialMLP, submodules=...)``) with
    :class:`BatchedSequentialMLP` in its place; any other experts class (``TEGroupedMLP``)
    unchanged."""
    if not isinstance(builder, functools.partial) or builder.func is not SequentialMLP:
        return builder
    return functools.partial(BatchedSequentialMLP, *builder.args, **builder.keywords)
