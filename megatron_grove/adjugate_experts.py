"""Adjugate experts as extra "virtual experts" of Megatron's token dispatchers.

Grove MoE has ``E`` routed experts in ``G`` groups of ``n = E/G`` contiguous experts and one
adjugate expert ``A_j`` per group. Under expert parallelism (``ep`` ranks, ``ep | G``) rank
``r`` holds routed experts ``r*E/ep ... (r+1)*E/ep - 1`` — whole groups — and the adjugates of
exactly those groups, ``r*G/ep ... (r+1)*G/ep - 1``.

Megatron's dispatchers send each token once per (token, expert) column of a routing map
whose expert ``c`` lives on rank ``c // num_local_experts``. We hand them ``E + G`` virtual
experts laid out rank-major, so that rule still holds::

    rank 0: [experts 0 .. E/ep-1 | adjugates 0 .. G/ep-1] | rank 1: [...] | ...

A token goes to adjugate ``j`` iff it selected an expert of group ``j``, with weight
``lam * sum_{i in S ∩ G_j} rho_i``; it therefore reaches each ``A_j`` at most once, and the
experts' weighted sum is the Grove output
``sum_{i in S} rho_i E_i(x) + lam * sum_j (sum_{i in S ∩ G_j} rho_i) A_j(x)``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_grove.megatron_config import GroveTransformerConfig

__all__ = ["VirtualExpertLayout", "VirtualExpertAlltoAllDispatcher", "adjugate_experts_config",
           "virtual_dispatcher_config"]


@dataclass(frozen=True)
class VirtualExpertLayout:
    """Where routed experts and adjugates sit among the ``E + G`` virtual experts."""

    num_experts: int  # E
    num_groups: int  # G
    ep_size: int
    adjugate_scale: float  # lam

    def __post_init__(self) -> None:
        E, G, ep = self.num_experts, self.num_groups, self.ep_size
        if G < 1 or E % G:
            raise ValueError(f"moe_num_expert_groups={G} must divide num_moe_experts={E}")
        if G % ep:
            raise ValueError(f"expert_model_parallel_size={ep} must divide moe_num_expert_groups="
                             f"{G}: a group's experts and its adjugate live on one rank")

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    @property
    def local_experts(self) -> int:
        """Routed experts per EP rank."""
        return self.num_experts // self.ep_size

    @property
    def local_adjugates(self) -> int:
        """Adjugate experts per EP rank."""
        return self.num_groups // self.ep_size

    @property
    def local_virtual_experts(self) -> int:
        return self.local_experts + self.local_adjugates

    def local_virtual_indices(self, ep_rank: int) -> list[int]:
        """The virtual-expert columns held by ``ep_rank`` (contiguous, rank-major)."""
        start = ep_rank * self.local_virtual_experts
        return list(range(start, start + self.local_virtual_experts))

    def extend(self, probs: torch.Tensor, routing_map: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routed ``probs`` ``[T, E]`` (zero off the selection) and ``routing_map`` ``[T, E]``
        bool -> virtual ``probs`` ``[T, E+G]`` and ``routing_map`` ``[T, E+G]``: the adjugate
        column of group ``j`` holds ``lam * sum_{i in S ∩ G_j} rho_i`` and ``S hits G_j``."""
        T, G, n = probs.shape[0], self.num_groups, self.experts_per_group
        group_probs = self.adjugate_scale * probs.reshape(T, G, n).sum(dim=-1)
        group_hit = routing_map.reshape(T, G, n).any(dim=-1)
        return (self._interleave(probs, group_probs),
                self._interleave(routing_map, group_hit))

    def _interleave(self, experts: torch.Tensor, adjugates: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` and ``[T, G]`` -> ``[T, E+G]`` in the rank-major virtual layout."""
        T, ep = experts.shape[0], self.ep_size
        return torch.cat([experts.reshape(T, ep, self.local_experts),
                          adjugates.reshape(T, ep, self.local_adjugates)], dim=-1).reshape(T, -1)


def virtual_dispatcher_config(config: GroveTransformerConfig) -> TransformerConfig:
    """The config a stock dispatcher needs to serve the ``E + G`` virtual experts."""
    dispatcher_config = copy.copy(config)
    dispatcher_config.num_moe_experts = config.num_moe_experts + config.moe_num_expert_groups
    return dispatcher_config


class VirtualExpertAlltoAllDispatcher(MoEAlltoAllTokenDispatcher):
    """Megatron's all-to-all dispatcher over virtual experts.

    Megatron sizes a dropless permutation as tokens x top-k; a token here has between k+1 and
    2k virtual experts, so the size is the routing map's count — Megatron's own dynamic-size
    path (as with token dropping), synchronised before the first permutation.
    """

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """``routing_map`` ``[T, E+G]`` -> tokens per local virtual expert."""
        tokens_per_local_expert = super().preprocess(routing_map)
        self.num_out_tokens = routing_map.sum()
        self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_local_expert


def adjugate_experts_config(config: GroveTransformerConfig) -> TransformerConfig:
    """The config Megatron's experts class needs to build the SwiGLU adjugate experts
    (intermediate size ``moe_adjugate_ffn_hidden_size``)."""
    adjugate_config = copy.copy(config)
    adjugate_config.moe_ffn_hidden_size = config.moe_adjugate_ffn_hidden_size
    return adjugate_config
