"""Token dispatchers of the Grove layer: one interface (:mod:`.base`), one class per strategy.

=================  ===========================================  ==================================
``moe.token_``     class                                        a token crosses the EP wire
``dispatcher_type``
=================  ===========================================  ==================================
``alltoall``       :class:`.VirtualExpertAlltoAllDispatcher`    once per (token, expert) and per
                                                                (token, group hit): adjugates as
                                                                extra experts of Megatron's
                                                                all-to-all
``allgather``      :class:`.VirtualExpertAllGatherDispatcher`   to every EP rank (Megatron's
                                                                all-gather)
``grove_alltoall`` :class:`.GroupAwareAlltoAllDispatcher`       once per destination EP rank;
                                                                adjugates beside their group
``grove_``         :class:`.GroveHierarchicalDispatcher`        once per destination node across
``hierarchical``                                                nodes, then once per destination
                                                                rank inside the node; adjugates
                                                                beside their group
=================  ===========================================  ==================================

A new strategy (e.g. over Megatron's flex / DeepEP dispatcher) is one class implementing
:class:`~.base.GroveDispatcher` on a Megatron dispatcher, with its analytic rows per token
(:meth:`~.base.GroveDispatcher.expected_copies`, which the planner reads), plus its entry in
:data:`GROVE_DISPATCHERS`: the one table of strategies.
"""

from __future__ import annotations

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.dispatchers.base import (
    DispatchedTokens,
    ExpectedCopies,
    ExpertBatch,
    GroveDispatcher,
)
from megatron_grove.moe.dispatchers.group_aware import GroupAwareAlltoAllDispatcher
from megatron_grove.moe.dispatchers.hierarchical import GroveHierarchicalDispatcher
from megatron_grove.moe.dispatchers.virtual_experts import (
    VirtualExpertAllGatherDispatcher,
    VirtualExpertAlltoAllDispatcher,
)
from megatron_grove.moe.layout import ExpertLayout

__all__ = ["GROVE_DISPATCHERS", "build_grove_dispatcher", "GroveDispatcher", "DispatchedTokens",
           "ExpectedCopies",
           "ExpertBatch", "VirtualExpertAlltoAllDispatcher", "VirtualExpertAllGatherDispatcher",
           "GroupAwareAlltoAllDispatcher", "GroveHierarchicalDispatcher"]

# moe.token_dispatcher_type (GroveTransformerConfig.moe_grove_dispatcher) -> strategy
GROVE_DISPATCHERS: dict[str, type[GroveDispatcher]] = {
    "alltoall": VirtualExpertAlltoAllDispatcher,
    "allgather": VirtualExpertAllGatherDispatcher,
    "grove_alltoall": GroupAwareAlltoAllDispatcher,
    "grove_hierarchical": GroveHierarchicalDispatcher,
}


def build_grove_dispatcher(config: GroveTransformerConfig, layout: ExpertLayout, ep_rank: int,
                           pg_collection=None) -> GroveDispatcher:
    """The dispatcher ``config.moe_grove_dispatcher`` names, for EP rank ``ep_rank``."""
    try:
        cls = GROVE_DISPATCHERS[config.moe_grove_dispatcher]
    except KeyError:
        raise ValueError(f"moe_grove_dispatcher={config.moe_grove_dispatcher!r}: allowed "
                         f"{', '.join(GROVE_DISPATCHERS)}") from None
    return cls(config, layout, ep_rank, pg_collection=pg_collection)
