"""Aux-loss-free load balancing: the per-step update of every router's expert bias.

After each optimizer step the trainer calls :func:`update_expert_bias`. For every
:class:`~megatron_grove.moe.router.GroveTopKRouter` in training mode it sums the tokens each expert
received over the step's micro-batches and over the ranks that route different tokens, moves the
bias against the load and resets the counters. With ``F`` the tokens per expert (``[E]``) and
``Q = mean(F)``:

* ``'paper'`` (Grove MoE / DeepSeek-V3 style, the default):
  ``b <- b - rate * (F - Q) / RMS(F - Q)``; no change where ``F - Q`` is all zero.
* ``'megatron'``: Megatron-Core's sign rule, ``b <- b + rate * sign(Q - F)``
  (``get_updated_expert_bias``).
* ``'none'``: no bias; the counts are still reduced, returned and reset.

A bias that does not take part in selection (``moe.expert_bias_in_selection: false``) is left
as it is: balancing it would change nothing the model computes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_updated_expert_bias

from megatron_grove.moe.router import GroveTopKRouter

__all__ = ["BIAS_UPDATE_RULES", "paper_bias_update", "update_expert_bias", "training_routers"]

BIAS_UPDATE_RULES = ("paper", "megatron", "none")


def paper_bias_update(tokens_per_expert: torch.Tensor, expert_bias: torch.Tensor,
                      rate: float) -> torch.Tensor:
    """The paper's rule on ``[..., E]`` tensors: ``b - rate * (F - Q) / RMS(F - Q)`` per row,
    with ``Q`` the row mean and RMS over experts; rows with ``RMS = 0`` are left unchanged."""
    deviation = tokens_per_expert - tokens_per_expert.mean(dim=-1, keepdim=True)
    rms = deviation.pow(2).mean(dim=-1, keepdim=True).sqrt()
    step = torch.where(rms > 0, deviation / rms.clamp_min(torch.finfo(rms.dtype).tiny), 0.0)
    return expert_bias - rate * step


def training_routers(model_chunks: list[torch.nn.Module]) -> list[GroveTopKRouter]:
    """The training-mode Grove routers of ``model_chunks``, in module (= layer) order."""
    return [module for chunk in model_chunks for module in chunk.modules()
            if isinstance(module, GroveTopKRouter) and module.training]


@torch.no_grad()
def update_expert_bias(model_chunks: list[torch.nn.Module], rule: str, rate: float,
                       group: Optional[dist.ProcessGroup] = None) -> list[torch.Tensor]:
    """Update the expert bias of every training-mode ``GroveTopKRouter`` in ``model_chunks``
    (call once per step, after the optimizer step; every rank of ``group`` must call it).

    ``group``: the ranks whose token counts are summed, by default Megatron's
    tensor+data(+context)-parallel group, as Megatron's own update.
    Returns the global tokens per expert of each router (``[E]`` fp32 each, in module order,
    i.e. layer order) for logging; the routers' ``local_tokens_per_expert`` are reset to zero.
    """
    if rule not in BIAS_UPDATE_RULES:
        raise ValueError(f"bias update rule {rule!r}: allowed {', '.join(BIAS_UPDATE_RULES)}")
    routers = training_routers(model_chunks)
    if not routers:
        return []
    if group is None:
        group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    tokens = torch.stack([router.local_tokens_per_expert for router in routers])  # [L, E]
    if rule == "none":
        dist.all_reduce(tokens, group=group)
    else:
        missing = [i for i, router in enumerate(routers) if router.expert_bias is None]
        if missing:
            raise ValueError(f"bias update rule {rule!r}, but router {missing[0]} keeps no expert "
                             "bias (it was built with moe_bias_update_rule='none')")
        biases = torch.stack([router.expert_bias for router in routers])
        if rule == "megatron":
            new_biases = get_updated_expert_bias(tokens, biases, rate, tp_dp_cp_group=group)
        else:
            dist.all_reduce(tokens, group=group)
            new_biases = paper_bias_update(tokens, biases, rate)
        for router, new_bias in zip(routers, new_biases):
            if router.bias_selects:
                router.expert_bias.copy_(new_bias)
    for router in routers:
        router.local_tokens_per_expert.zero_()
    return list(tokens.unbind(0))
