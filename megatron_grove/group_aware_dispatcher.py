"""``GroupAwareAlltoAllDispatcher``: each token crosses the EP all-to-all once per destination
rank, and a group's adjugate runs beside its experts, once per (token, group).

Under expert parallelism (``ep`` ranks, ``ep | G``) rank ``r`` holds routed experts
``r*L ... (r+1)*L - 1`` (``L = E/ep``: whole groups) and the adjugates of those groups (see
:mod:`megatron_grove.adjugate_experts`). Megatron's ``MoEAlltoAllTokenDispatcher`` sends one row
per (token, expert) column of its routing map, the expert of column ``c`` living on rank
``c // num_local_experts``. We hand it ``ep`` columns, one pseudo-expert per rank, so it sends
one row per (token, destination rank), and let it carry beside each row the token's routing
weights of the destination's ``L`` experts (the "probs" channel of Megatron's
``token_dispatch``, ``[rows, L]`` instead of ``[rows]``; their gradient flows back through the
same all-to-all)::

    source      probs/routing_map [T, E] -> rank_map [T, ep] = "selected an expert on rank r"
                Megatron permute: hidden [T, H] -> rows [N, H] sorted by destination rank,
                beside them weights [N, L] = probs[token, r*L:(r+1)*L]
    all-to-all  Megatron's token_dispatch (rows and weights)
    destination expand_to_local_experts: [R, L] weights -> (row, local expert) and
                (row, local group) index lists; routed experts and adjugates run on them;
                reduce_to_received_tokens: one partial sum per received row [R, H]
    all-to-all  Megatron's token_combine (weight 1: the probs are already applied)
    source      Megatron's unpermute adds each token's partial sums: [T, H]

:func:`expand_to_local_experts` and :func:`reduce_to_received_tokens` are the local permute and
the per-token reduction (the places for fused kernels); :class:`LocalExpansion` documents the
index tensors they share.

A selected expert is recognised on the destination by a non-zero weight: an expert selected
with weight exactly 0 (fp32 underflow) adds nothing to the output and is skipped, so the
router gets no gradient through it (the stock dispatchers would pass ``E_i(x) . dy``).
Supported: tensor_model_parallel_size = 1 (TP/sequence parallel raise a clear error),
dropless routing (no capacity factor).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from megatron_grove.adjugate_experts import VirtualExpertAlltoAllDispatcher, VirtualExpertLayout
from megatron_grove.megatron_config import GroveTransformerConfig

__all__ = ["GroupAwareAlltoAllDispatcher", "LocalExpansion", "expand_to_local_experts",
           "reduce_to_received_tokens", "rank_dispatcher_config"]


@dataclass
class LocalExpansion:
    """How the ``R`` rows a rank received map to its local experts and adjugates.

    ``routed_rows [N_r]`` (int64): the received row of each (row, local expert) pair, sorted
    by local expert (then row); ``routed_probs [N_r]``: its routing weight;
    ``tokens_per_expert [L]`` (int64, CPU): pairs per local expert.
    ``adjugate_rows [N_a]``, ``adjugate_probs [N_a]`` (``lam`` x the group's summed weight),
    ``tokens_per_adjugate [G/ep]`` (int64, CPU): the same for (row, local group) pairs.
    """

    routed_rows: torch.Tensor
    routed_probs: torch.Tensor
    tokens_per_expert: torch.Tensor
    adjugate_rows: torch.Tensor
    adjugate_probs: torch.Tensor
    tokens_per_adjugate: torch.Tensor


def _pairs_by_column(weights: torch.Tensor, selected: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``weights``/``selected`` ``[R, C]`` -> (rows ``[N]``, weights ``[N]``, counts ``[C]``) of
    the selected (row, column) pairs, sorted by column then row."""
    columns, rows = selected.T.nonzero(as_tuple=True)
    return rows, weights[rows, columns], selected.sum(dim=0).cpu()


def expand_to_local_experts(weights: torch.Tensor, experts_per_group: int,
                            adjugate_scale: float) -> LocalExpansion:
    """Received routing weights ``[R, L]`` (0 where the row's token did not select the local
    expert; ``L`` a multiple of ``experts_per_group``) -> the (row, expert) and (row, group)
    pairs to compute. A group's adjugate weight is ``adjugate_scale`` x the sum of the
    weights of its experts."""
    R, L = weights.shape
    selected = weights != 0
    routed_rows, routed_probs, tokens_per_expert = _pairs_by_column(weights, selected)
    groups = L // experts_per_group
    group_weights = adjugate_scale * weights.reshape(R, groups, experts_per_group).sum(dim=-1)
    group_hit = selected.reshape(R, groups, experts_per_group).any(dim=-1)
    adjugate_rows, adjugate_probs, tokens_per_adjugate = _pairs_by_column(group_weights,
                                                                          group_hit)
    return LocalExpansion(routed_rows, routed_probs, tokens_per_expert,
                          adjugate_rows, adjugate_probs, tokens_per_adjugate)


def reduce_to_received_tokens(routed_output: torch.Tensor, adjugate_output: torch.Tensor,
                              expansion: LocalExpansion, num_rows: int) -> torch.Tensor:
    """Weighted expert outputs ``[N_r, H]`` and adjugate outputs ``[N_a, H]`` (rows as in
    ``expansion``) -> one partial sum per received row ``[num_rows, H]``."""
    out = routed_output.new_zeros(num_rows, routed_output.shape[-1])
    out = out.index_add(0, expansion.routed_rows, routed_output)
    return out.index_add(0, expansion.adjugate_rows, adjugate_output.to(out.dtype))


def rank_dispatcher_config(config: GroveTransformerConfig, ep_size: int
                           ) -> GroveTransformerConfig:
    """The config Megatron's all-to-all dispatcher needs to serve one pseudo-expert per rank."""
    if config.tensor_model_parallel_size > 1 or config.sequence_parallel:
        raise ValueError("moe_token_dispatcher_type=grove_alltoall supports "
                         "tensor_model_parallel_size=1 without sequence parallelism only "
                         f"(got {config.tensor_model_parallel_size}, sequence_parallel="
                         f"{config.sequence_parallel}); use alltoall for tensor parallelism")
    rank_config = copy.copy(config)
    rank_config.num_moe_experts = ep_size
    return rank_config


class GroupAwareAlltoAllDispatcher(VirtualExpertAlltoAllDispatcher):
    """Megatron's all-to-all dispatcher over one pseudo-expert per EP rank (a token has 1..ep
    rows, so the permutation is sized by the routing map's count, as for the virtual experts).

    ``dispatch_preprocess(hidden [S, B, H], routing_map [T, E], probs [T, E])`` -> rows
    ``[N, H]`` and weights ``[N, L]`` (``N`` = (token, destination rank) pairs, sorted by
    rank); ``token_dispatch`` / ``dispatch_postprocess`` deliver the ``[R, H]`` rows and
    ``[R, L]`` weights this rank receives (ordered by source rank); ``combine_preprocess`` /
    ``token_combine`` / ``combine_postprocess`` take one partial sum per received row back and
    add them per token: ``[S, B, H]``.
    """

    def __init__(self, layout: VirtualExpertLayout, ep_rank: int,
                 config: GroveTransformerConfig, pg_collection=None) -> None:
        super().__init__(1, [ep_rank], config=rank_dispatcher_config(config, layout.ep_size),
                         pg_collection=pg_collection)
        self.layout = layout

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``routing_map``/``probs`` ``[T, E]`` (probs 0 off the selection) -> rows ``[N, H]``
        and their destination's weights ``[N, L]``."""
        T, ep, L = routing_map.shape[0], self.layout.ep_size, self.layout.local_experts
        rank_map = routing_map.reshape(T, ep, L).any(dim=-1)
        rows, _ = super().dispatch_preprocess(hidden_states, rank_map, rank_map.to(probs.dtype))
        source_token = self.reversed_local_input_permutation_mapping  # [N]
        destination = torch.repeat_interleave(
            torch.arange(ep, device=rank_map.device), rank_map.sum(dim=0))  # [N]
        weights = probs.reshape(T, ep, L)[source_token, destination]
        return rows, weights
