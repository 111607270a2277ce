"""The language-model loss under a per-token loss mask, and its reduction over a step.

Megatron's convention: the loss function returns ``(sum of masked losses, number of loss tokens,
report)``. With ``train.per_token_loss`` (Megatron's ``calculate_per_token_loss``) the step's
loss is the mean over the loss tokens of the **global batch**: Megatron sums the micro-batches'
losses, ``finalize_model_grads`` divides the gradients by the loss tokens summed over the
data-parallel ranks. Without it (the default, pretraining's definition) each micro-batch's loss
is its own per-token mean, and the step's loss is their mean over micro-batches and
data-parallel ranks. The two agree when every micro-batch has as many loss tokens (plain text
without padding); with chat data (few, uneven loss tokens) only the first weighs every
assistant token alike.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

__all__ = ["masked_token_loss", "StepLoss", "reduce_step_loss"]


def masked_token_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Megatron's ``loss_func`` for per-token losses ``output`` [b, s] under ``loss_mask``
    [b, s] (1.0: counts): ``(loss sum, loss tokens (int), {"lm loss": [sum, tokens]})``."""
    mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(output.reshape(-1).float() * mask)
    tokens = mask.sum()
    # a copy: Megatron's schedule divides the returned loss in place
    return loss_sum, tokens.to(torch.int), {"lm loss": torch.stack([loss_sum.detach(), tokens])}


class StepLoss:
    """One step's (or one validation's) loss, from the ``"lm loss"`` reports of this rank's
    micro-batches (each ``[2]``: loss sum, loss tokens; a collective over the data-parallel
    x context-parallel group): ``local`` (this rank's loss, a
    0-d tensor, for the non-finite check), ``value`` (the step's loss, as the module docstring
    defines it; NaN when the global batch has no loss token) and ``tokens`` (loss tokens of
    the global batch). A global batch without loss tokens has a NaN loss and is skipped as
    non-finite (no update)."""

    def __init__(self, reports: list[torch.Tensor], per_token: bool) -> None:
        sums = torch.stack(reports)  # [micro-batches, 2]: loss sum, loss tokens
        # under CP each rank holds a share of every sequence: its loss sums and tokens too
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        if per_token:
            total = sums.double().sum(0)
            self.local = total[0].clone()
        else:  # float32 throughout, as the per-micro-batch losses themselves
            self.local = (sums[:, 0] / sums[:, 1].clamp(min=1)).mean()
            total = torch.stack([self.local, sums[:, 1].sum()])
        dist.all_reduce(total, group=group)
        self.tokens = int(total[1])
        if not per_token:
            self.value = float(total[0]) / dist.get_world_size(group)
        elif self.tokens:
            self.value = float(total[0] / total[1])
        else:  # nothing to learn from: non-finite on every rank, so the step is skipped
            self.value = float("nan")
            self.local = total[0].new_tensor(float("nan"))


def reduce_step_loss(reports: torch.Tensor, per_token: bool) -> StepLoss:
    """:class:`StepLoss` of a schedule's loss reports ``[micro-batches, 2]`` (loss sum, loss
    tokens), as :func:`~megatron_grove.training.step.last_stage_losses` gathers them on every
    pipeline stage."""
    return StepLoss(list(reports), per_token)
