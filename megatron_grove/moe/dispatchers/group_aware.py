"""``GroupAwareAlltoAllDispatcher``: each token crosses the EP all-to-all once per destination
rank, and a group's adjugate runs beside its experts, once per (token, group).

Under expert parallelism (``ep`` ranks, ``ep | G``) rank ``r`` holds routed experts
``r*L ... (r+1)*L - 1`` (``L = E/ep``: whole groups) and the adjugates of those groups (see
:class:`~megatron_grove.moe.layout.ExpertLayout`). Megatron's ``MoEAlltoAllTokenDispatcher``
sends one row per (token, expert) column of its routing map, the expert of column ``c`` living
on rank ``c // num_local_experts``. We hand it ``ep`` columns, one pseudo-expert per rank, so
it sends one row per (token, destination rank), and let it carry beside each row the token's
routing weights of the destination's ``L`` experts (the "probs" channel of Megatron's
``token_dispatch``, ``[rows, L]`` instead of ``[rows]``; their gradient flows back through the
same all-to-all)::

    source      probs/routing_map [T, E] -> rank_map [T, ep] = "selected an expert on rank r"
                Megatron permute: hidden [T, H] -> rows [N, H] sorted by destination rank,
                beside them weights [N, L] = probs[token, r*L:(r+1)*L]
    all-to-all  token_dispatch: rows and weights side by side, one collective
    destination expert_batches: expand_to_local_experts, [R, L] weights -> (row, local
                expert) and (row, local group) pairs with their weights in one index pass;
                the layer runs its routed experts and adjugates on the gathered rows;
                combine_outputs: reduce_to_received_tokens, one partial sum per received
                row [R, H]
    all-to-all  Megatron's token_combine (weight 1: the weights are already applied)
    source      Megatron's unpermute adds each token's partial sums: [T, H]

Where an adjugate's weight ``lam * sum_{i in S ∩ G_j} rho_i`` is applied depends on
``config.grove_kernels_backend``: with ``torch`` (CPU) it rides in the adjugate bank's probs,
which Megatron's MLP multiplies into the ``fa``-wide intermediate (its gradient comes from
there too), and the combine is a plain scatter-add; with ``triton`` the adjugates run with
weight 1 and the fused Grove combine kernel reads the weights inside its scatter-add.
:func:`expand_to_local_experts` and :func:`reduce_to_received_tokens` are the local permute and
the per-token reduction (:mod:`megatron_grove.kernels` ops: permute, unpermute, Grove combine);
:class:`LocalExpansion` documents the index tensors they share.

A selected expert is recognised on the destination by a non-zero weight: an expert selected
with weight exactly 0 (fp32 underflow) adds nothing to the output and is skipped, so the
router gets no gradient through it (the stock dispatchers would pass ``E_i(x) . dy``).
Tensor parallelism (with sequence parallelism, as Megatron requires for MoE) is Megatron's:
after the EP all-to-all its dispatcher gathers the received rows and their weights over the TP
group, and the TP-split experts and adjugates run on them. Dropless routing only (no capacity
factor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel import all_to_all

from megatron_grove.kernels.grove_combine import grove_combine
from megatron_grove.kernels.permute import permute, sorted_rows, unpermute
from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.dispatchers.base import (
    DispatchedTokens,
    ExpectedCopies,
    ExpertBatch,
    GroveDispatcher,
    columns_config,
    expected_blocks_hit,
)
from megatron_grove.moe.dispatchers.virtual_experts import VariableCopiesAlltoAll
from megatron_grove.moe.layout import ExpertLayout

__all__ = ["GroupAwareAlltoAllDispatcher", "LocalExpansion", "expand_to_local_experts",
           "reduce_to_received_tokens"]


@dataclass
class LocalExpansion:
    """How the ``R`` rows a rank received map to its local experts and adjugates.

    ``routed_rows [N_r]`` (int64): the received row of each (row, local expert) pair, sorted
    by local expert (then row); ``routed_probs [N_r]``: its routing weight;
    ``tokens_per_expert [L]`` (int64, CPU): pairs per local expert.
    ``adjugate_rows [N_a]``, ``adjugate_groups [N_a]`` (local group index),
    ``tokens_per_adjugate [G/ep]`` (int64, CPU): the same for (row, local group) pairs;
    ``adjugate_probs [N_a]``: ``lam`` x the group's summed routing weight when
    ``adjugates_weighted`` (the adjugate bank applies it), else 1 (the Grove combine applies it).
    """

    routed_rows: torch.Tensor
    routed_probs: torch.Tensor
    tokens_per_expert: torch.Tensor
    adjugate_rows: torch.Tensor
    adjugate_groups: torch.Tensor
    adjugate_probs: torch.Tensor
    tokens_per_adjugate: torch.Tensor
    adjugates_weighted: bool


def expand_to_local_experts(weights: torch.Tensor, experts_per_group: int,
                            adjugate_scale: Optional[float] = None) -> LocalExpansion:
    """Received routing weights ``[R, L]`` (0 where the row's token did not select the local
    expert; ``L`` a multiple of ``experts_per_group``) -> the (row, expert) and (row, group)
    pairs to compute, with their weights. ``adjugate_scale`` (``lam``): the adjugate pairs weigh
    ``lam`` x their group's summed weight; None: they weigh 1 (the combine weighs them).

    One index pass for both banks: the pairs of ``[selected | group hit]`` ``[R, L + G/ep]``
    in column order (experts, then groups), one host copy of the counts."""
    R, L = weights.shape
    groups = L // experts_per_group
    selected = weights != 0
    group_hit = selected.reshape(R, groups, experts_per_group).any(dim=-1)
    rows, columns, tokens_per_column = sorted_rows(torch.cat([selected, group_hit], dim=1))
    tokens_per_column = tokens_per_column.cpu()
    routed = int(tokens_per_column[:L].sum())
    if adjugate_scale is None:
        adjugate_probs = weights.new_ones(rows.shape[0] - routed)
    else:  # in the pairs' order: group-major, then row (as sorted_rows)
        group_weight = adjugate_scale * weights.reshape(R, groups, experts_per_group).sum(dim=-1)
        adjugate_probs = group_weight.t().masked_select(group_hit.t())
    return LocalExpansion(
        routed_rows=rows[:routed], routed_probs=weights.t().masked_select(selected.t()),
        tokens_per_expert=tokens_per_column[:L], adjugate_rows=rows[routed:],
        adjugate_groups=columns[routed:] - L, adjugate_probs=adjugate_probs,
        tokens_per_adjugate=tokens_per_column[L:], adjugates_weighted=adjugate_scale is not None)


def reduce_to_received_tokens(routed_output: torch.Tensor, adjugate_output: torch.Tensor,
                              expansion: LocalExpansion, weights: torch.Tensor,
                              experts_per_group: int, adjugate_scale: float,
                              backend: str = "torch") -> torch.Tensor:
    """The banks' outputs (rows as in ``expansion``: routed ``[N_r, H]`` weighted by their
    probs; adjugate ``[N_a, H]`` weighted when ``expansion.adjugates_weighted``), received
    weights ``[R, L]`` -> one partial sum per received row ``[R, H]``: the routed scatter-add
    (:func:`megatron_grove.kernels.permute.unpermute`), then the adjugates' scatter-add, or,
    for unweighted adjugates, the Grove combine that weighs them
    (:func:`megatron_grove.kernels.grove_combine.grove_combine`: group weights fused with the
    scatter-add)."""
    partial = unpermute(routed_output, expansion.routed_rows, None, weights.shape[0], backend)
    adjugate_output = adjugate_output.to(partial.dtype)
    if expansion.adjugates_weighted:
        return partial.index_add_(0, expansion.adjugate_rows, adjugate_output)
    return grove_combine(adjugate_output, expansion.adjugate_rows, expansion.adjugate_groups,
                         weights, experts_per_group, adjugate_scale, base=partial,
                         backend=backend)


class GroupAwareAlltoAllDispatcher(GroveDispatcher, VariableCopiesAlltoAll):
    """Megatron's all-to-all dispatcher over one pseudo-expert per EP rank (a token has 1..ep
    rows, so the permutation is sized by the routing map's count).

    ``dispatch_preprocess(hidden [S, B, H], routing_map [T, E], probs [T, E])`` -> rows
    ``[N, H]`` and weights ``[N, L]`` (``N`` = (token, destination rank) pairs, sorted by
    rank); ``token_dispatch`` delivers the ``[R, H]`` rows and ``[R, L]`` weights this rank
    receives (ordered by source rank); :meth:`expert_batches` expands them to local (row,
    expert) and (row, group) pairs; :meth:`combine_outputs` reduces the banks' outputs to one
    partial sum per received row; ``token_combine`` / ``combine_postprocess`` take them back and
    add them per token: ``[S, B, H]``.
    """

    def __init__(self, config: GroveTransformerConfig, layout: ExpertLayout, ep_rank: int,
                 pg_collection=None) -> None:
        super().__init__(1, [ep_rank], config=columns_config(config, layout.ep_size),
                         pg_collection=pg_collection)
        self.layout = layout

    @classmethod
    def expected_copies(cls, num_experts: int, topk: int, num_groups: int, ep: int,
                        nodes: int = 1) -> ExpectedCopies:
        """``hits(E, k, ep)`` rows (once per destination rank), flat, each with the
        destination's ``E/ep`` weights."""
        return ExpectedCopies.flat(expected_blocks_hit(num_experts, topk, ep), ep, nodes,
                                   routing_values=num_experts // ep)

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
        self.rows_sent = rows.shape[0]
        return rows, weights

    def token_dispatch(self, rows: torch.Tensor, weights: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's EP all-to-all of the rows ``[N, H]`` and their weights ``[N, L]``; of one
        dtype (always so in fp32, and in bf16 unless the router's probs are fp32) they travel
        side by side as one ``[N, H + L]`` tensor: one collective instead of two, forward and
        backward. Returns the received ``[R, H]`` rows and ``[R, L]`` weights."""
        if rows.dtype != weights.dtype or self.shared_experts is not None:
            return super().token_dispatch(rows, weights)
        self.tokens_per_expert = self._maybe_dtoh_and_synchronize(
            "before_ep_alltoall", self.tokens_per_expert)
        received = all_to_all(self.ep_group, torch.cat([rows, weights], dim=1),
                              self.output_splits, self.input_splits,
                              use_nccl_stream=self.use_nccl_stream)
        received_rows, received_weights = torch.split(
            received, [rows.shape[1], weights.shape[1]], dim=1)
        if self.tp_size > 1:  # Megatron's TP gather takes them next
            return received_rows.contiguous(), received_weights.contiguous()
        return received_rows, received_weights

    def expert_batches(self, hidden_states: torch.Tensor, probs: torch.Tensor
                       ) -> DispatchedTokens:
        """Received rows ``[R, H]`` and weights ``[R, L]`` -> the routed experts' (row, expert)
        rows with their weights and the adjugates' (row, group) rows with theirs (torch
        backend) or weight 1 (Triton: the fused Grove combine applies them)."""
        rows, _, weights = self.dispatch_postprocess(hidden_states, probs)
        backend = self.config.grove_kernels_backend
        expansion = expand_to_local_experts(
            weights, self.layout.experts_per_group,
            self.layout.adjugate_scale if backend == "torch" else None)
        # two gathers, not one split in two: a slice's backward fills a zero tensor of the
        # whole gathered size, a gather's scatter-adds into the R received rows
        return DispatchedTokens(
            routed=ExpertBatch(permute(rows, expansion.routed_rows, backend),
                               expansion.tokens_per_expert, expansion.routed_probs),
            adjugate=ExpertBatch(permute(rows, expansion.adjugate_rows, backend),
                                 expansion.tokens_per_adjugate, expansion.adjugate_probs),
            combine_state=(expansion, weights))

    def combine_outputs(self, routed_output: torch.Tensor, adjugate_output: torch.Tensor,
                        tokens: DispatchedTokens) -> torch.Tensor:
        expansion, weights = tokens.combine_state
        partial = reduce_to_received_tokens(
            routed_output, adjugate_output, expansion, weights, self.layout.experts_per_group,
            self.layout.adjugate_scale, self.config.grove_kernels_backend)
        return self.combine_preprocess(partial)
