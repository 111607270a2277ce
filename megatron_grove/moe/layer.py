"""``GroveMoELayer``: Megatron-Core's ``MoELayer`` plus one adjugate expert per expert group.

For a token ``x`` with selected experts ``S`` and routing weights ``rho`` (from the router)::

    y = sum_{i in S} rho_i E_i(x) + lam * sum_{j: S hits G_j} (sum_{i in S ∩ G_j} rho_i) A_j(x)

with ``G`` groups of ``E/G`` contiguous experts, ``A_j`` a SwiGLU expert of intermediate size
``moe_adjugate_ffn_hidden_size`` and ``lam = moe_adjugate_scale``. Each ``A_j(x)`` is evaluated
once per (token, group).

``forward`` is Megatron's; only the stages that touch the experts change, and they talk to the
dispatcher through one interface (:mod:`megatron_grove.moe.dispatchers.base`), whatever the
strategy (``moe_grove_dispatcher``: adjugates as extra experts of Megatron's all-to-all or
all-gather, or the group-aware all-to-all):

* ``preprocess``: Megatron's (the dispatcher takes the router's ``[T, E]`` probs/map);
* ``routed_experts_compute``: ``expert_batches`` gives the routed experts' and the adjugates'
  inputs, ``experts`` (``E/ep`` routed experts) and ``adjugate_experts`` (``G/ep`` adjugates,
  the same experts class) run on them, ``combine_outputs`` prepares Megatron's combine.

Both expert banks come from the layer spec's experts builder, so Megatron's expert-parallel
parameter flags, gradient reduction and sharded checkpoints (``experts.*`` and
``adjugate_experts.*``, indexed by global expert / group) apply to both. The adjugate bank's
``SequentialMLP`` (local spec) is :class:`~megatron_grove.moe.batched_experts.BatchedSequentialMLP`:
the same modules, its ``G/ep`` small experts computed as one batched product.

Counters: ``grove_counters`` is a dict of Python ints, accumulated over forwards until the
trainer zeroes them (:func:`megatron_grove.moe.counters.reset_moe_counters`):

* ``"dispatched_rows"``: token rows this rank's dispatcher sent to another rank or kept locally
  (all-to-alls: the permuted rows; allgather: every token to every EP rank);
* ``"routed_rows"``: (token, routed expert) rows computed by this rank's routed experts;
* ``"adjugate_rows"``: token rows computed by this rank's adjugates (one per (token, group));
* ``"internode_rows"`` / ``"intranode_rows"``: rows this rank's dispatch sent to another node /
  to another rank of its node (the dispatcher's ``link_rows``);
* ``"forwards"``: forward passes counted.

``routed_rows`` and ``adjugate_rows`` count this rank's compute (the tokens it *received*);
summed over the EP group they give the group's (token, expert) and (token, group) pairs.
As Megatron's router counts tokens, a forward in training mode counts only with gradients
enabled, so a layer under full activation recomputation counts once per micro-batch (in the
recomputation), not twice; forwards in eval mode always count.
Per-expert token load is the router's ``local_tokens_per_expert``.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.batched_experts import batched_experts_builder
from megatron_grove.moe.dispatchers import build_grove_dispatcher
from megatron_grove.moe.layout import ExpertLayout

__all__ = ["GroveMoELayer"]


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


def _adjugate_experts_config(config: GroveTransformerConfig) -> GroveTransformerConfig:
    """The config Megatron's experts class needs to build the SwiGLU adjugate experts
    (intermediate size ``moe_adjugate_ffn_hidden_size``)."""
    adjugate_config = copy.copy(config)
    adjugate_config.moe_ffn_hidden_size = config.moe_adjugate_ffn_hidden_size
    return adjugate_config


class GroveMoELayer(MoELayer):
    """Grove MoE layer: ``forward(hidden_states [S, B, H]) -> (output [S, B, H], None)``.

    Attributes beyond ``MoELayer``'s: ``layout`` (:class:`ExpertLayout`), ``adjugate_experts``
    (this rank's ``G/ep`` adjugates) and ``grove_counters``; ``token_dispatcher`` is a
    :class:`~megatron_grove.moe.dispatchers.base.GroveDispatcher`.
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
        self.layout = ExpertLayout(config.num_moe_experts, config.moe_num_expert_groups,
                                   self.ep_group.size(), config.moe_adjugate_scale)
        # MoELayer built Megatron's dispatcher for the E routed experts; ours also serves the
        # adjugates.
        self.token_dispatcher = build_grove_dispatcher(config, self.layout, self.ep_group.rank(),
                                                       pg_collection=pg_collection)
        self.adjugate_experts = batched_experts_builder(self.submodules.experts)(
            self.layout.local_adjugates,
            _adjugate_experts_config(config),
            pg_collection=pg_collection,
            name=(name + ".adjugate_experts") if name is not None else None,
        )
        self.grove_counters: dict[str, int] = {"dispatched_rows": 0, "routed_rows": 0,
                                               "adjugate_rows": 0, "internode_rows": 0,
                                               "intranode_rows": 0, "forwards": 0}

    def _counting(self) -> bool:
        """Whether this forward counts: not the no-grad first pass of a recomputed layer."""
        return torch.is_grad_enabled() or not self.training

    def preprocess(self, hidden_states: torch.Tensor, probs: torch.Tensor,
                   routing_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's preprocess (the dispatcher's ``dispatch_preprocess`` of the router's
        ``[T, E]`` probs and map), counting the rows it sends."""
        rows, row_probs = super().preprocess(hidden_states, probs, routing_map)
        if self._counting():
            self.grove_counters["dispatched_rows"] += self.token_dispatcher.rows_sent
        return rows, row_probs

    def routed_experts_compute(self, hidden_states: torch.Tensor, probs: torch.Tensor
                               ) -> tuple[torch.Tensor, None]:
        """Run this rank's routed experts and adjugates on the tokens it received and prepare
        the combine."""
        tokens = self.token_dispatcher.expert_batches(hidden_states, probs)
        routed_output, _ = self.experts(*tokens.routed)
        adjugate_output, _ = self.adjugate_experts(*tokens.adjugate)
        if self._counting():
            self.grove_counters["routed_rows"] += tokens.routed.rows.shape[0]
            self.grove_counters["adjugate_rows"] += tokens.adjugate.rows.shape[0]
            internode, intranode = self.token_dispatcher.link_rows()
            self.grove_counters["internode_rows"] += internode
            self.grove_counters["intranode_rows"] += intranode
            self.grove_counters["forwards"] += 1
        return self.token_dispatcher.combine_outputs(routed_output, adjugate_output, tokens), None
