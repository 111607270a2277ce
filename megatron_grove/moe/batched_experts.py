"""``BatchedSequentialMLP``: Megatron's ``SequentialMLP`` (the same expert MLP modules,
parameters, initialisation and sharded checkpoints) whose forward runs all local experts as
one batched product instead of a Python loop over them.

The Grove layer's adjugate bank holds ``G/ep`` small experts of one shape (the 33B recipe: 8
adjugates of FFN 128 per rank at EP=8; 32 of FFN 8 in the CPU benchmark's 33B-shaped MoE).
Megatron's local spec runs them one by one, ~30 operations each forward and backward, which on
CPU costs more than their arithmetic. Here the rows (sorted by expert, ``tokens_per_expert``
of them each) are placed in a zero-padded ``[n, m, H]`` block (``m`` = the busiest expert's
rows), the experts' weights are stacked, and two ``torch.bmm`` compute every expert at once::

    x [N, H] -> x_pad [n, m, H];  h = x_pad @ W1^T [n, m, 2f];  a = silu(gate) * up * probs
    y_pad = a @ W2^T [n, m, H] -> y [N, H]   (padding rows dropped)

Every row's output is the same function as Megatron's MLP computes (fp32 rounding aside).
Gradients reach each expert's own ``linear_fc1`` / ``linear_fc2`` weight through the stack.
Anything the batched product does not reproduce (biases, another activation, TE or Triton
activation modules, a clamp or offset on the GLU, FP8/FP4, probs applied on the input,
expert tensor parallelism, fused or delayed weight-gradient accumulation) takes Megatron's loop.
With TransformerEngine the bank is ``TEGroupedMLP`` (a grouped GEMM) and this class is unused.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

__all__ = ["BatchedSequentialMLP", "batched_experts_builder"]


class BatchedSequentialMLP(SequentialMLP):
    """``forward(rows [N, H] sorted by expert, tokens_per_expert [n] (CPU), probs [N]) ->
    (out [N, H], None)``, as Megatron's ``SequentialMLP`` (module docstring)."""

    def _batched(self) -> bool:
        c = self.config
        return (self.num_local_experts > 1 and c.gated_linear_unit and c.activation_func is F.silu
                and not c.add_bias_linear and not c.use_te_activation_func
                and not c.bias_activation_fusion and c.activation_func_clamp_value is None
                and c.glu_linear_offset == 0.0 and not c.fp8 and not c.fp4
                and not c.moe_apply_probs_on_input and not c.gradient_accumulation_fusion
                and not c.delay_wgrad_compute and self.tp_group.size() == 1)

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self._batched() or x.shape[0] == 0:
            return super().forward(x, tokens_per_expert, permuted_probs)
        n, rows = self.num_local_experts, x.shape[0]
        counts = tokens_per_expert.to(device=x.device, dtype=torch.long)
        width = int(tokens_per_expert.max())
        expert = torch.repeat_interleave(torch.arange(n, device=x.device), counts)  # [N]
        first = torch.cumsum(counts, 0) - counts  # first row of each expert
        slot = expert * width + torch.arange(rows, device=x.device) - first[expert]  # [N]
        padded = x.new_zeros(n * width, x.shape[1]).index_copy(0, slot, x)
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts])  # [n, 2f, H]
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts])  # [n, H, f]
        gate, up = torch.bmm(padded.view(n, width, -1), w1.transpose(1, 2)).chunk(2, dim=-1)
        probs = permuted_probs.new_zeros(n * width).index_copy(0, slot, permuted_probs)
        glu = F.silu(gate) * up  # Megatron's MLP: glu, the per-token scale, the glu's dtype
        act = (glu * probs.view(n, width, 1)).to(glu.dtype)
        out = torch.bmm(act, w2.transpose(1, 2)).view(n * width, -1)
        return out.index_select(0, slot), None


def batched_experts_builder(builder: functools.partial) -> functools.partial:
    """A layer spec's experts builder (``partial(SequentialMLP, submodules=...)``) with
    :class:`BatchedSequentialMLP` in its place; any other experts class (``TEGroupedMLP``)
    unchanged."""
    if not isinstance(builder, functools.partial) or builder.func is not SequentialMLP:
        return builder
    return functools.partial(BatchedSequentialMLP, *builder.args, **builder.keywords)
