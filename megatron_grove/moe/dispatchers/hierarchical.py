"""``GroveHierarchicalDispatcher``: group-aware dispatch in two stages, so that a token crosses
the inter-node link once per destination node, its group's adjugate beside the group.

The EP group is ``nodes x P`` ranks (:mod:`megatron_grove.runtime.node_groups`), EP rank
``e = node * P + local_index`` holding experts ``e*L ... (e+1)*L - 1`` (``L = E/ep``) and their
groups' adjugates. Each stage is a :class:`~.group_aware.GroupAwareAlltoAllDispatcher` (Megatron's
all-to-all over one pseudo-expert per destination, the destination's routing weights riding
beside each row)::

    stage 1    across nodes, among the EP ranks with this local index (``inter_node``): one row
               per (token, destination node) ``[N1, H]`` with that node's ``E/nodes`` weights
               ``[N1, E/nodes]``, sent as the selected weights and their columns (``2k``
               values instead of ``E/nodes``, :class:`SelectedWeightsAlltoAll`); received:
               ``[R1, H]``, ``[R1, E/nodes]`` (the "landing" rank)
    stage 2    inside the node (``intra_node``): the landing rank forwards each received row
               once per destination rank of its node ``[N2, H]`` with that rank's ``L`` weights
               (a row's selection = its non-zero weights); received ``[R2, H]``, ``[R2, L]``
    experts    exactly ``grove_alltoall``'s: (row, expert) and (row, group) pairs, each
               adjugate once per (token, group), one partial sum per received row
    combine    stage 2 backwards: the landing rank adds the partial sums of each row it
               forwarded (Megatron's unpermute) -> ``[R1, H]``; stage 1 backwards: one row per
               (token, node) crosses back and the source adds them -> ``[S, B, H]``

**Exactness.** A token's output is the sum over its destination ranks of their partial sums,
as with ``grove_alltoall``; here the sum is bracketed by node (the forwarding rank's sum, then
the source's). Each partial sum is computed by the same operations from the same rows and
weights (a row and its weights are copied, never changed, on the way), so outputs and gradients
equal ``grove_alltoall``'s up to the order of these additions (fp32: ~1e-7 relative).

With the EP group on one node, stage 1 is skipped and this is ``grove_alltoall``, the same code.
Tensor parallelism (sequence parallel) is Megatron's, in stage 2: stage 1 runs per TP rank
(without the TP gather), stage 2's dispatcher gathers the received rows over the expert-TP
group and reduce-scatters the combine, as ``grove_alltoall`` does.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.dispatchers.base import ExpectedCopies, expected_blocks_hit, rows_off
from megatron_grove.moe.dispatchers.group_aware import GroupAwareAlltoAllDispatcher
from megatron_grove.moe.layout import ExpertLayout
from megatron_grove.runtime.node_groups import node_groups

__all__ = ["GroveHierarchicalDispatcher", "SelectedWeightsAlltoAll", "selected_slots"]


def selected_slots(width: int, topk: int) -> int:
    """Routing slots of a stage-1 row: ``min(k, width)`` (selected weight, column) pairs when
    that is fewer values than the ``width`` weights of the node, else 0 (send the weights)."""
    slots = min(topk, width)
    return slots if 2 * slots < width else 0


class SelectedWeightsAlltoAll(GroupAwareAlltoAllDispatcher):
    """Stage 1's transport: a row carries its destination node's selected weights and their
    columns (``2 m`` values, ``m = min(k, E/nodes)``, :func:`selected_slots`) instead of all
    ``E/nodes`` weights; the landing rank scatters them back to ``[R, E/nodes]``, the same
    tensor. The columns travel in the rows' dtype, exact while ``E/nodes`` fits its mantissa."""

    def token_dispatch(self, rows: torch.Tensor, weights: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``[N, H]`` and weights ``[N, E/nodes]`` -> received ``[R, H]``,
        ``[R, E/nodes]``."""
        width = weights.shape[1]
        slots = selected_slots(width, self.config.moe_router_topk)
        if not slots or width > 2 / torch.finfo(weights.dtype).eps:  # columns exact
            return super().token_dispatch(rows, weights)
        # the selected (non-zero) columns first; a row with fewer pads with zero-weight columns
        columns = (weights != 0).to(torch.int8).argsort(dim=1, descending=True,
                                                        stable=True)[:, :slots]
        packed = torch.cat([weights.gather(1, columns), columns.to(weights.dtype)], dim=1)
        received_rows, received = super().token_dispatch(rows, packed)
        values, received_columns = received.split([slots, slots], dim=1)
        return received_rows, values.new_zeros(values.shape[0], width).scatter(
            1, received_columns.long(), values)


class GroveHierarchicalDispatcher(GroupAwareAlltoAllDispatcher):
    """Stage 2 (inside the node) and the expert side are the inherited group-aware dispatcher
    over the node's ``P`` EP ranks (layout: the node's ``E/nodes`` experts); stage 1 is
    :attr:`across_nodes`, a group-aware dispatcher over the ``nodes`` ranks with this local
    index, one pseudo-rank per node, without tensor parallelism (None on one node).

    ``dispatch_preprocess(hidden [S, B, H], routing_map [T, E], probs [T, E])`` -> stage-1 rows
    ``[N1, H]`` and weights ``[N1, E/nodes]``; ``token_dispatch`` runs stage 1, then stage 2,
    and returns the ``[R2, H]`` rows and ``[R2, L]`` weights this rank computes on;
    ``token_combine`` runs stage 2's combine and the landing rank's sum, then stage 1's
    all-to-all; ``combine_postprocess`` adds each token's rows from its nodes: ``[S, B, H]``.
    """

    def __init__(self, config: GroveTransformerConfig, layout: ExpertLayout, ep_rank: int,
                 pg_collection=None) -> None:
        nodes = node_groups()
        self.across_nodes: Optional[GroupAwareAlltoAllDispatcher] = None
        if nodes.nodes == 1:
            super().__init__(config, layout, ep_rank, pg_collection=pg_collection)
            return
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        E, G, lam = layout.num_experts, layout.num_groups, layout.adjugate_scale
        inside = copy.copy(pg_collection)
        inside.ep, inside.tp_ep = nodes.intra_node, nodes.intra_node_tp_ep
        super().__init__(config, ExpertLayout(E // nodes.nodes, G // nodes.nodes,
                                              nodes.ranks_per_node, lam),
                         nodes.local_index, pg_collection=inside)
        across = copy.copy(pg_collection)
        across.ep, across.tp_ep, across.expt_tp = nodes.inter_node, nodes.inter_node, None
        self.across_nodes = SelectedWeightsAlltoAll(
            config, ExpertLayout(E, G, nodes.nodes, lam), nodes.node, pg_collection=across)

    @classmethod
    def expected_copies(cls, num_experts: int, topk: int, num_groups: int, ep: int,
                        nodes: int = 1) -> ExpectedCopies:
        """On one node ``grove_alltoall``'s; else ``hits(E, k, nodes)`` stage-1 rows, of which
        a share ``(nodes - 1)/nodes`` crosses nodes with the node's selected weights and their
        columns (or its ``E/nodes`` weights when fewer), and ``hits(E, k, ep) (P - 1)/P`` rows
        forwarded inside nodes with ``E/ep`` weights."""
        if nodes == 1:
            return super().expected_copies(num_experts, topk, num_groups, ep)
        per_node, nodes_hit = ep // nodes, expected_blocks_hit(num_experts, topk, nodes)
        width = num_experts // nodes
        return ExpectedCopies(
            copies=nodes_hit, internode=nodes_hit * (nodes - 1) / nodes,
            intranode=expected_blocks_hit(num_experts, topk, ep) * (per_node - 1) / per_node,
            routing_values=num_experts // ep,
            internode_routing_values=2 * selected_slots(width, topk) or width,
            route="hierarchical")

    def dispatch_preprocess(self, hidden_states: torch.Tensor, routing_map: torch.Tensor,
                            probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1's rows ``[N1, H]`` (one per (token, destination node)) and their node's
        weights ``[N1, E/nodes]``; ``rows_sent`` counts them."""
        if self.across_nodes is None:
            return super().dispatch_preprocess(hidden_states, routing_map, probs)
        rows, weights = self.across_nodes.dispatch_preprocess(hidden_states, routing_map, probs)
        self.rows_sent = self.across_nodes.rows_sent
        return rows, weights

    def token_dispatch(self, rows: torch.Tensor, weights: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1 across nodes, then stage 2 inside the node -> ``[R2, H]``, ``[R2, L]``."""
        if self.across_nodes is None:
            return super().token_dispatch(rows, weights)
        stage1 = self.across_nodes
        landed, _, landed_weights = stage1.dispatch_postprocess(
            *stage1.token_dispatch(rows, weights))
        forwarded, forwarded_weights = super().dispatch_preprocess(
            landed, landed_weights != 0, landed_weights)
        self.rows_sent = stage1.rows_sent  # the rows this rank's tokens made, not the forwarded
        return super().token_dispatch(forwarded, forwarded_weights)

    def link_rows(self) -> tuple[int, int]:
        """Stage 1's rows to other nodes and stage 2's rows to other ranks of the node."""
        if self.across_nodes is None:
            return super().link_rows()
        return (rows_off(self.across_nodes.input_splits, self.across_nodes.ep_rank),
                rows_off(self.input_splits, self.ep_rank))

    def token_combine(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Stage 2's all-to-all back, the landing rank's sum per stage-1 row ``[R1, H]``, then
        stage 1's all-to-all back: ``[N1, H]``."""
        if self.across_nodes is None:
            return super().token_combine(hidden_states, *args, **kwargs)
        landed = super().combine_postprocess(super().token_combine(hidden_states))
        stage1 = self.across_nodes
        return stage1.token_combine(stage1.combine_preprocess(landed))

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Each token's rows from its destination nodes added: ``[S, B, H]``."""
        if self.across_nodes is None:
            return super().combine_postprocess(hidden_states)
        return self.across_nodes.combine_postprocess(hidden_states)
