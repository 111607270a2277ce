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
from typing import Any, Iterator

import torch

from megatron_grove.megatron_config import GroveTransformerConfig

__all__ = ["ExpertBatch", "DispatchedTokens", "GroveDispatcher", "columns_config"]


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


class GroveDispatcher:
    """Mixin of every Grove token dispatcher (module docstring). ``rows_sent`` is the number of
    token rows the last ``dispatch_preprocess`` put on the wire or kept locally (the
    ``copies_sent_per_token`` counter)."""

    rows_sent: int = 0

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
