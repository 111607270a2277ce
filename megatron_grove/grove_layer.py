"""``GroveMoELayer``: Megatron-Core's ``MoELayer`` plus one adjugate expert per expert group.

For a token ``x`` with selected experts ``S`` and routing weights ``rho`` (from the router)::

    y = sum_{i in S} rho_i E_i(x) + lam * sum_{j: S hits G_j} (sum_{i in S ∩ G_j} rho_i) A_j(x)

with ``G`` groups of ``E/G`` contiguous experts, ``A_j`` a SwiGLU expert of intermediate size
``moe_adjugate_ffn_hidden_size`` and ``lam = moe_adjugate_scale``. Each ``A_j(x)`` is evaluated
once per (token, group).

Only Megatron's stages change (``forward`` is Megatron's):

* ``preprocess``: the router's ``[T, E]`` probs/routing map become ``[T, E+G]`` over "virtual
  experts" (routed experts and adjugates, rank-major; see
  :mod:`megatron_grove.adjugate_experts`) and go to Megatron's ``allgather`` dispatcher or its
  ``alltoall`` one (sized for a varying number of copies per token), built for ``(E+G)/ep``
  local virtual experts.
* ``routed_experts_compute``: the received tokens, sorted by local virtual expert, are split
  between ``experts`` (Megatron's experts class, ``E/ep`` routed experts) and
  ``adjugate_experts`` (the same class, ``G/ep`` adjugates), which both apply their probs.

With ``moe_group_aware_dispatch`` (``moe.token_dispatcher_type: grove_alltoall``) the layer
uses :class:`~megatron_grove.group_aware_dispatcher.GroupAwareAlltoAllDispatcher` instead: one
row per (token, EP rank) carrying the token's weights for that rank's experts; the receiving
rank expands the rows to its experts and adjugates and returns one partial sum per row.

Both expert modules come from the layer spec's experts builder, so Megatron's expert-parallel
parameter flags, gradient reduction and sharded checkpoints (``experts.*`` and
``adjugate_experts.*``, indexed by global expert / group) apply to both.

Counters: ``grove_counters`` is a dict of Python ints, accumulated over forwards until the
trainer zeroes them (:func:`megatron_grove.moe_stats.reset_moe_counters`):

* ``"dispatched_rows"``: token rows this rank's dispatcher sent to another rank or kept locally
  (all-to-alls: the permuted rows; allgather: every token to every EP rank);
* ``"routed_rows"``: (token, routed expert) rows computed by this rank's routed experts;
* ``"adjugate_rows"``: token rows computed by this rank's adjugates (one per (token, group));
* ``"forwards"``: forward passes counted.

``routed_rows`` and ``adjugate_rows`` count this rank's compute (the tokens it *received*);
summed over the EP group they give the group's (token, expert) and (token, group) pairs.
Activation recomputation counts twice.
Per-expert token load is the router's ``local_tokens_per_expert``.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAllGatherTokenDispatcher,
    MoEAlltoAllTokenDispatcher,
)

from kernels.permute import permute
from megatron_grove.adjugate_experts import (
    VirtualExpertAlltoAllDispatcher,
    VirtualExpertLayout,
    adjugate_experts_config,
    virtual_dispatcher_config,
)
from megatron_grove.group_aware_dispatcher import (
    GroupAwareAlltoAllDispatcher,
    expand_to_local_experts,
    reduce_to_received_tokens,
)
from megatron_grove.megatron_config import GroveTransformerConfig

__all__ = ["GroveMoELayer"]

# Megatron's dispatcher for the layer's config -> the one we build for the virtual experts.
_VIRTUAL_DISPATCHERS = {
    MoEAlltoAllTokenDispatcher: VirtualExpertAlltoAllDispatcher,
    MoEAllGatherTokenDispatcher: MoEAllGatherTokenDispatcher,
}


def _check_supported(config: GroveTransformerConfig) -> None:
    unsupported = {
        "moe_expert_capacity_factor": config.moe_expert_capacity_factor is not None,
        "moe_router_padding_for_quantization": config.moe_router_padding_for_quantization,
        "moe_shared_expert_overlap": config.moe_shared_expert_overlap,
        "overlap_dispatch_backward_with_experts_wgrad":
            config.overlap_dispatch_backward_with_experts_wgrad,
        "moe_latent_size": config.moe_latent_size is not None,
    }
    for name, is_set in unsupported.items():
        if is_set:
            raise ValueError(f"GroveMoELayer does not support {name}={getattr(config, name)!r}")


class GroveMoELayer(MoELayer):
    """Grove MoE layer: ``forward(hidden_states [S, B, H]) -> (output [S, B, H], None)``.

    Attributes beyond ``MoELayer``'s: ``layout`` (:class:`VirtualExpertLayout`),
    ``adjugate_experts`` (this rank's ``G/ep`` adjugates) and ``grove_counters``.
    """

    def __init__(self, config: GroveTransformerConfig, submodules: Optional[MoESubmodules] = None,
                 layer_number: Optional[int] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 is_mtp_layer: bool = False, name: Optional[str] = None) -> None:
        _check_supported(config)
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number,
                         pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)
        dispatcher_cls = _VIRTUAL_DISPATCHERS.get(type(self.token_dispatcher))
        if dispatcher_cls is None:
            raise ValueError(f"GroveMoELayer supports the alltoall and allgather dispatchers, "
                             f"not moe_token_dispatcher_type={config.moe_token_dispatcher_type!r}")
        self.layout = VirtualExpertLayout(config.num_moe_experts, config.moe_num_expert_groups,
                                          self.ep_group.size(), config.moe_adjugate_scale)
        self.group_aware = config.moe_group_aware_dispatch
        if self.group_aware and dispatcher_cls is not VirtualExpertAlltoAllDispatcher:
            raise ValueError("moe_group_aware_dispatch needs moe_token_dispatcher_type='alltoall'")
        # MoELayer built its dispatcher for the E routed experts; ours serves E+G virtual ones
        # or, group-aware, one pseudo-expert per EP rank.
        if self.group_aware:
            self.token_dispatcher = GroupAwareAlltoAllDispatcher(
                self.layout, self.ep_group.rank(), config, pg_collection=pg_collection)
        else:
            self.token_dispatcher = dispatcher_cls(
                self.layout.local_virtual_experts,
                self.layout.local_virtual_indices(self.ep_group.rank()),
                config=virtual_dispatcher_config(config),
                pg_collection=pg_collection,
            )
        self.adjugate_experts = self.submodules.experts(
            self.layout.local_adjugates,
            adjugate_experts_config(config),
            pg_collection=pg_collection,
            name=(name + ".adjugate_experts") if name is not None else None,
        )
        self.grove_counters: dict[str, int] = {"dispatched_rows": 0, "routed_rows": 0,
                                               "adjugate_rows": 0, "forwards": 0}

    def preprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor,
                   routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``probs``/``routing_map`` ``[T, E]`` -> what the dispatcher sends: Megatron's
        preprocess over the ``[T, E+G]`` virtual experts, or the group-aware dispatcher's
        rows ``[N, H]`` and weights ``[N, E/ep]``."""
        if not self.group_aware:
            probs, routing_map = self.layout.extend(probs, routing_map)
        rows, row_probs = super().preprocess(hidden_states, probs, routing_map)
        # allgather sends every token to every EP rank; the all-to-alls send their rows
        copies = self.ep_group.size() if isinstance(self.token_dispatcher,
                                                    MoEAllGatherTokenDispatcher) else 1
        self.grove_counters["dispatched_rows"] += rows.reshape(-1, rows.shape[-1]).shape[0] * copies
        return rows, row_probs

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor
                               ) -> tuple[torch.Tensor, None]:
        """Run this rank's routed experts and adjugates on the tokens it received and prepare
        the combine."""
        if self.group_aware:
            return self._group_aware_experts_compute(hidden_states, probs), None
        tokens, tokens_per_virtual, permuted_probs = (
            self.token_dispatcher.dispatch_postprocess(hidden_states, probs))
        routed_counts = tokens_per_virtual[:self.layout.local_experts]
        adjugate_counts = tokens_per_virtual[self.layout.local_experts:]
        num_routed = int(routed_counts.sum())
        routed_output, _ = self.experts(tokens[:num_routed], routed_counts,
                                        permuted_probs[:num_routed])
        adjugate_output, _ = self.adjugate_experts(tokens[num_routed:], adjugate_counts,
                                                   permuted_probs[num_routed:])
        self.grove_counters["routed_rows"] += num_routed
        self.grove_counters["adjugate_rows"] += tokens.shape[0] - num_routed
        self.grove_counters["forwards"] += 1
        output = torch.cat([routed_output, adjugate_output], dim=0)
        return self.token_dispatcher.combine_preprocess(output), None

    def _group_aware_experts_compute(self, hidden_states: torch.Tensor, weights: torch.Tensor
                                     ) -> torch.Tensor:
        """Received rows ``[R, H]`` and their local routing weights ``[R, E/ep]`` -> one
        partial sum per row, ready for the combine."""
        rows, _, weights = self.token_dispatcher.dispatch_postprocess(hidden_states, weights)
        backend, layout = self.config.grove_kernels_backend, self.layout
        expansion = expand_to_local_experts(weights, layout.experts_per_group)
        routed_output, _ = self.experts(permute(rows, expansion.routed_rows, backend),
                                        expansion.tokens_per_expert, expansion.routed_probs)
        # adjugates unweighted: the combine applies lam x the group's weight
        adjugate_rows = permute(rows, expansion.adjugate_rows, backend)
        adjugate_output, _ = self.adjugate_experts(
            adjugate_rows, expansion.tokens_per_adjugate,
            adjugate_rows.new_ones(adjugate_rows.shape[0]))
        self.grove_counters["routed_rows"] += expansion.routed_rows.shape[0]
        self.grove_counters["adjugate_rows"] += expansion.adjugate_rows.shape[0]
        self.grove_counters["forwards"] += 1
        output = reduce_to_received_tokens(routed_output, adjugate_output, expansion, weights,
                                           layout.experts_per_group, layout.adjugate_scale,
                                           backend)
        return self.token_dispatcher.combine_preprocess(output)
