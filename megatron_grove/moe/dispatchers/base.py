"""The one interface between :class:`~megatron_grove.moe.layer.GroveMoELayer` and its token
dispatcher.

A Grove dispatcher is a Megatron ``MoETokenDispatcher`` (its stage methods keep Megatron's
contract, so ``MoELayer.forward`` drives it unchanged) with two more methods, which replace
``dispatch_postprocess`` / ``combine_preprocess`` for the layer::

    MoELayer.preprocess   dispatch_preprocess(hidden [S, B, H], routing_map [T, E], probs [T, E])
    MoELayer.dispatch     token_dispatch(...)                       (communication)
    GroveMoELayer.routed_experts_compute:
        tokens = expert_batches(received, received_probs)          -> DispatchedTokens
        routed = experts(*tokens.routed); adjugate = adjugate_experts(*tokens.adjugate)
        combine_outputs(routed, adjugate, tokens)                  -> what token_combine sends
    MoELayer.combine      token_combine(...)                        (communication)
    MoELayer.postprocess  combine_postprocess(...)                  -> [S, B, H]

``routing_map``/``probs`` are the router's, over the ``E`` routed experts (probs zero off the
selection). How rows travel, and where the group weight ``lam * sum_{i in S ∩ G_j} rho_i`` of an
adjugate is applied, is the strategy's business; :class:`DispatchedTokens` carries whatever its
``combine_outputs`` needs back. The layer never looks at which strategy it has.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from math import comb
from typing import Any, Iterator

import torch

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.runtime.node_groups import node_groups

__all__ = ["ExpertBatch", "DispatchedTokens", "GroveDispatcher", "ExpectedCopies",
           "expected_blocks_hit", "columns_config", "rows_off"]


@dataclass
class ExpertBatch:
    """The input of one bank of local experts (Megatron's experts signature).

    ``rows`` ``[N, H]`` sorted by local expert; ``tokens_per_expert`` ``[num_local]`` (int64, on
    CPU); ``probs`` ``[N]``: the weight each expert output is multiplied by.
    """

    rows: torch.Tensor
    tokens_per_expert: torch.Tensor
    probs: torch.Tensor

    def __iter__(self) -> Iterator[torch.Tensor]:
        """``experts(*batch)``."""
        return iter((self.rows, self.tokens_per_expert, self.probs))


@dataclass
class DispatchedTokens:
    """What :meth:`GroveDispatcher.expert_batches` hands the layer: the routed experts' and the
    adjugates' inputs, and ``combine_state``, opaque to the layer, for
    :meth:`GroveDispatcher.combine_outputs`."""

    routed: ExpertBatch
    adjugate: ExpertBatch
    combine_state: Any = None


def expected_blocks_hit(num_experts: int, topk: int, num_blocks: int) -> float:
    """Expected number of the ``num_blocks`` equal contiguous blocks of experts that ``topk``
    distinct uniformly chosen experts fall in: ``n (1 - C(E - E/n, k) / C(E, k))``."""
    if num_experts % num_blocks:
        raise ValueError(f"{num_blocks} blocks must divide {num_experts} experts")
    missed = comb(num_experts - num_experts // num_blocks, topk) / comb(num_experts, topk)
    return num_blocks * (1.0 - missed)


@dataclass(frozen=True)
class ExpectedCopies:
    """A strategy's rows per token and MoE layer under uniform top-k routing, analytic, for an
    EP group of ``ep`` ranks on ``nodes`` nodes (``P = ep / nodes`` each).

    ``copies``: rows its dispatch makes, local ones included (the ``copies_sent_per_token``
    counter); ``internode`` / ``intranode``: rows that cross to another node / to another rank
    of the same node (the ``internode_copies_per_token`` / ``intranode_copies_per_token``
    counters); ``routing_values`` / ``internode_routing_values``: values a dispatched row carries
    beside its hidden vector inside a node / across nodes (a combined row carries the hidden
    vector only); ``route``: ``flat`` (each row straight to its rank) or ``hierarchical``."""

    copies: float
    internode: float
    intranode: float
    routing_values: int
    internode_routing_values: int
    route: str = "flat"

    @classmethod
    def flat(cls, copies: float, ep: int, nodes: int, routing_values: int) -> "ExpectedCopies":
        """A flat all-to-all's ``copies`` spread evenly over the EP ranks: a share
        ``(ep - P)/ep`` crosses nodes, ``(P - 1)/ep`` leaves the rank inside the node."""
        per_node = ep // nodes
        return cls(copies, copies * (ep - per_node) / ep, copies * (per_node - 1) / ep,
                   routing_values, routing_values)


def rows_off(splits, index: int) -> int:
    """Rows of an all-to-all's ``input_splits`` (rows per destination; None: a group of one)
    that go to another member than ``index``."""
    return 0 if splits is None else int(sum(splits)) - int(splits[index])


class GroveDispatcher:
    """Mixin of every Grove token dispatcher (module docstring). ``rows_sent`` is the number of
    token rows the last ``dispatch_preprocess`` put on the wire or kept locally (the
    ``copies_sent_per_token`` counter)."""

    rows_sent: int = 0

    @classmethod
    def expected_copies(cls, num_experts: int, topk: int, num_groups: int, ep: int,
                        nodes: int = 1) -> ExpectedCopies:
        """This strategy's analytic rows per token (the planner's table of strategies);
        ``num_groups`` 0: a plain MoE (no adjugates)."""
        raise NotImplementedError

    def link_rows(self) -> tuple[int, int]:
        """Rows the last ``token_dispatch`` sent to another node and to another rank of this
        node (the ``internode_copies_per_token`` / ``intranode_copies_per_token`` counters).
        This default reads a flat all-to-all's rows per destination EP rank (Megatron's
        ``input_splits``) against the EP group's nodes."""
        splits = getattr(self, "input_splits", None)
        if splits is None:  # EP = TP = 1: every row stays
            return 0, 0
        per_node = node_groups().ranks_per_node
        node = self.ep_rank // per_node
        on_node = [int(n) for n in splits[node * per_node:(node + 1) * per_node]]
        return int(sum(splits)) - sum(on_node), sum(on_node) - on_node[self.ep_rank % per_node]

    def expert_batches(self, hidden_states: torch.Tensor, probs: torch.Tensor
                       ) -> DispatchedTokens:
        """``token_dispatch``'s outputs -> this rank's routed-expert and adjugate inputs."""
        raise NotImplementedError

    def combine_outputs(self, routed_output: torch.Tensor, adjugate_output: torch.Tensor,
                        tokens: DispatchedTokens) -> torch.Tensor:
        """The banks' outputs (rows as in ``tokens``) -> the tensor ``token_combine`` sends."""
        raise NotImplementedError


def columns_config(config: GroveTransformerConfig, num_columns: int) -> GroveTransformerConfig:
    """``config`` for a stock Megatron dispatcher whose routing map has ``num_columns`` columns
    ("experts"; the Grove dispatchers' columns are virtual experts or EP ranks)."""
    stock = copy.copy(config)
    stock.num_moe_experts = num_columns
    return stock
