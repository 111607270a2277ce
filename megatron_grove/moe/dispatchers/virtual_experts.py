"""Adjugates as extra "virtual experts" of Megatron's stock dispatchers
(``moe.token_dispatcher_type: alltoall | allgather``).

Megatron's dispatchers send each token once per (token, expert) column of a routing map whose
expert ``c`` lives on rank ``c // num_local_experts``. We hand them ``E + G`` virtual experts laid
out rank-major (see :class:`~megatron_grove.moe.layout.ExpertLayout`), so that rule still holds::

    rank 0: [experts 0 .. E/ep-1 | adjugates 0 .. G/ep-1] | rank 1: [...] | ...

A token goes to adjugate ``j`` iff it selected an expert of group ``j``, with weight
``lam * sum_{i in S ∩ G_j} rho_i``; it reaches each ``A_j`` at most once, and the weighted sum of
all virtual experts' outputs is the Grove output. A token is sent ``k + (groups hit)`` times
with the all-to-all (the cost the group-aware dispatcher removes), and to every EP rank with the
all-gather.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.dispatchers.base import (
    DispatchedTokens,
    ExpectedCopies,
    ExpertBatch,
    GroveDispatcher,
    columns_config,
    expected_blocks_hit,
)
from megatron_grove.moe.layout import ExpertLayout
from megatron_grove.runtime.node_groups import node_groups

__all__ = ["extend_to_virtual_experts", "VariableCopiesAlltoAll",
           "VirtualExpertAlltoAllDispatcher", "VirtualExpertAllGatherDispatcher"]


def extend_to_virtual_experts(layout: ExpertLayout, probs: torch.Tensor,
                              routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Routed ``probs`` ``[T, E]`` (zero off the selection) and ``routing_map`` ``[T, E]`` bool ->
    virtual ``probs`` and ``routing_map`` ``[T, E+G]``: the adjugate column of group ``j`` holds
    ``lam * sum_{i in S ∩ G_j} rho_i`` and ``S hits G_j``."""
    T, G, n = probs.shape[0], layout.num_groups, layout.experts_per_group
    group_probs = layout.adjugate_scale * probs.reshape(T, G, n).sum(dim=-1)
    group_hit = routing_map.reshape(T, G, n).any(dim=-1)

    def rank_major(experts: torch.Tensor, adjugates: torch.Tensor) -> torch.Tensor:
        ep = layout.ep_size
        return torch.cat([experts.reshape(T, ep, layout.local_experts),
                          adjugates.reshape(T, ep, layout.local_adjugates)], dim=-1).reshape(T, -1)

    return rank_major(probs, group_probs), rank_major(routing_map, group_hit)


def _virtual_columns(layout: ExpertLayout, ep_rank: int) -> list[int]:
    """The virtual-expert columns held by ``ep_rank`` (contiguous, rank-major)."""
    width = layout.local_experts + layout.local_adjugates
    return list(range(ep_rank * width, (ep_rank + 1) * width))


class VariableCopiesAlltoAll(MoEAlltoAllTokenDispatcher):
    """Megatron's all-to-all dispatcher when a token has a varying number of routing-map
    columns: Megatron sizes a dropless permutation as tokens x top-k; here it is the routing
    map's count (Megatron's own dynamic-size path, as with token dropping), synchronised before
    the first permutation."""

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """``routing_map`` ``[T, columns]`` -> rows per local column."""
        tokens_per_local_expert = super().preprocess(routing_map)
        self.num_out_tokens = routing_map.sum()
        self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_local_expert


class _VirtualExperts(GroveDispatcher):
    """The Grove side of a stock dispatcher over the ``E + G`` virtual experts: received rows
    arrive sorted by local virtual expert (routed experts first, then adjugates), each weighted
    by its column's prob, so both banks apply their probs and the combine is Megatron's."""

    def __init__(self, config: GroveTransformerConfig, layout: ExpertLayout, ep_rank: int,
                 pg_collection=None) -> None:
        columns = _virtual_columns(layout, ep_rank)
        super().__init__(len(columns), columns,
                         config=columns_config(config, layout.num_experts + layout.num_groups),
                         pg_collection=pg_collection)
        self.layout = layout

    def _count_rows_sent(self, rows: torch.Tensor) -> int:
        raise NotImplementedError

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``routing_map``/``probs`` ``[T, E]`` -> Megatron's preprocess over ``[T, E+G]``."""
        probs, routing_map = extend_to_virtual_experts(self.layout, probs, routing_map)
        rows, row_probs = super().dispatch_preprocess(hidden_states, routing_map, probs)
        self.rows_sent = self._count_rows_sent(rows)
        return rows, row_probs

    def expert_batches(self, hidden_states: torch.Tensor, probs: torch.Tensor
                       ) -> DispatchedTokens:
        rows, tokens_per_virtual, row_probs = self.dispatch_postprocess(hidden_states, probs)
        local = self.layout.local_experts
        num_routed = int(tokens_per_virtual[:local].sum())
        return DispatchedTokens(
            routed=ExpertBatch(rows[:num_routed], tokens_per_virtual[:local],
                               row_probs[:num_routed]),
            adjugate=ExpertBatch(rows[num_routed:], tokens_per_virtual[local:],
                                 row_probs[num_routed:]))

    def combine_outputs(self, routed_output: torch.Tensor, adjugate_output: torch.Tensor,
                        tokens: DispatchedTokens) -> torch.Tensor:
        return self.combine_preprocess(torch.cat([routed_output, adjugate_output], dim=0))


class VirtualExpertAlltoAllDispatcher(_VirtualExperts, VariableCopiesAlltoAll):
    """Megatron's all-to-all over the virtual experts: one row per (token, expert) and one per
    (token, group hit)."""

    @classmethod
    def expected_copies(cls, num_experts: int, topk: int, num_groups: int, ep: int,
                        nodes: int = 1) -> ExpectedCopies:
        """``k + hits(E, k, G)`` rows (``k`` for a plain MoE), flat, one weight each."""
        groups_hit = expected_blocks_hit(num_experts, topk, num_groups) if num_groups else 0.0
        return ExpectedCopies.flat(topk + groups_hit, ep, nodes, routing_values=1)

    def _count_rows_sent(self, rows: torch.Tensor) -> int:
        return rows.shape[0]


class VirtualExpertAllGatherDispatcher(_VirtualExperts, MoEAllGatherTokenDispatcher):
    """Megatron's all-gather over the virtual experts: every token goes to every EP rank."""

    def _count_rows_sent(self, rows: torch.Tensor) -> int:
        return rows.reshape(-1, rows.shape[-1]).shape[0] * self.layout.ep_size

    @classmethod
    def expected_copies(cls, num_experts: int, topk: int, num_groups: int, ep: int,
                        nodes: int = 1) -> ExpectedCopies:
        """Every token to every EP rank, with the weights of all ``E + G`` virtual experts."""
        per_node = ep // nodes
        return ExpectedCopies(float(ep), float(ep - per_node), float(per_node - 1),
                              num_experts + num_groups, num_experts + num_groups)

    def link_rows(self) -> tuple[int, int]:
        """Every token to every other EP rank: those on other nodes and those on this one."""
        tokens, per_node = self.rows_sent // self.layout.ep_size, node_groups().ranks_per_node
        return tokens * (self.layout.ep_size - per_node), tokens * (per_node - 1)
