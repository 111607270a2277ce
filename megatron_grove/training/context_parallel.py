"""Context parallelism (``parallel.context_parallel_size``): each CP rank holds a share of every
sequence, as Megatron expects it.

Megatron's attention under CP (``TEDotProductAttention``, GPU only; refused on CPU by
:mod:`megatron_grove.runtime.acceleration`) takes every rank's sequence share in Megatron's
load-balanced order: the sequence cut into ``2 CP`` chunks, rank ``r`` holding chunks ``r`` and
``2 CP - 1 - r`` (causal attention costs the same on every rank). :func:`cp_rank_share` hands
each micro-batch to Megatron's ``get_batch_on_this_cp_rank`` for that cut; the causal mask is
then TE's (no explicit mask is passed). Each CP rank's loss is the mean over its own tokens;
Megatron's DDP averages gradients over the data- and context-parallel ranks together, so with
the equal shares a full loss mask gives, the step is that of the whole sequences.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank

__all__ = ["cp_rank_share"]


def cp_rank_share(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{tokens, labels, loss_mask, position_ids}`` of ``[b, s]`` -> this CP rank's
    ``[b, s / CP]`` share (the batch itself when CP = 1). ``s`` must divide by ``2 CP``."""
    group = parallel_state.get_context_parallel_group()
    if group.size() == 1:
        return batch
    return get_batch_on_this_cp_rank(dict(batch), is_hybrid_cp=False, cp_group=group)
