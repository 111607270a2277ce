"""The expert-parallel group split by node, for hierarchical dispatch
(:class:`~megatron_grove.moe.dispatchers.hierarchical.GroveHierarchicalDispatcher`).

A node is ``ranks_per_node`` consecutive global ranks (torchrun's ``LOCAL_WORLD_SIZE``, or
``parallel.ranks_per_node``, which lets tests emulate nodes by rank groups). Megatron's EP group
of a rank (the same tensor-parallel rank, consecutive EP ranks in global-rank order) then falls
on ``nodes`` nodes with ``P`` of its ranks on each: EP rank ``e = node * P + local_index``.
Three groups serve the two stages of the dispatch:

* ``inter_node`` (size ``nodes``): the EP ranks with this rank's local index, one per node, in
  node order (stage 1: across nodes);
* ``intra_node`` (size ``P``): the EP ranks on this rank's node, in local-index order (stage 2);
* ``intra_node_tp_ep``: ``intra_node`` times the expert-TP group, in Megatron's ``tp_ep``
  order (EP-major), for the stage-2 dispatcher's token counts under tensor parallelism.

They are created once, collectively, by :func:`initialize_node_groups` (called by
:func:`~megatron_grove.runtime.distributed.initialize_parallel`), and only when an EP group
spans more than one node.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

from megatron_grove.config import ConfigError

__all__ = ["NodeGroups", "initialize_node_groups", "node_groups", "destroy_node_groups",
           "resolve_ranks_per_node"]


@dataclass(frozen=True)
class NodeGroups:
    """Where this rank's EP group lies on the nodes (module docstring). With ``nodes == 1`` the
    groups are None: the whole EP group is one node."""

    nodes: int
    ranks_per_node: int  # P: EP ranks of the group on each node
    node: int  # this rank's node among the EP group's nodes
    local_index: int  # this rank's index among its node's EP ranks
    inter_node: Optional[dist.ProcessGroup] = None
    intra_node: Optional[dist.ProcessGroup] = None
    intra_node_tp_ep: Optional[dist.ProcessGroup] = None


_NODE_GROUPS: Optional[NodeGroups] = None


def resolve_ranks_per_node(configured: Optional[int], world_size: int) -> int:
    """``parallel.ranks_per_node``, else torchrun's ``LOCAL_WORLD_SIZE``, else the whole world
    (one node); a ConfigError unless it divides the world size."""
    value = configured if configured is not None else int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                         world_size))
    if value < 1 or world_size % value:
        raise ConfigError(f"parallel.ranks_per_node={value}: must divide the world size "
                          f"{world_size} (ranks per node; default: torchrun's LOCAL_WORLD_SIZE)")
    return value


def _split_by_node(ranks: list[int], ranks_per_node: int) -> list[list[int]]:
    """``ranks`` (sorted global ranks) -> their runs on each node, in node order."""
    by_node: dict[int, list[int]] = {}
    for rank in ranks:
        by_node.setdefault(rank // ranks_per_node, []).append(rank)
    return [by_node[n] for n in sorted(by_node)]


def initialize_node_groups(ranks_per_node: int) -> NodeGroups:
    """Create the node groups of every EP group (collective: every rank, once, after Megatron's
    groups). A ConfigError when an EP group has unequal numbers of ranks on its nodes, or a node
    holds part of an expert-TP group."""
    global _NODE_GROUPS
    from megatron.core import parallel_state

    ep_group = parallel_state.get_expert_model_parallel_group()
    tp_ep_group = parallel_state.get_expert_tensor_and_model_parallel_group()
    mine = (tuple(dist.get_process_group_ranks(ep_group)),
            tuple(dist.get_process_group_ranks(tp_ep_group)))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    groups: set[tuple[int, ...]] = set()
    for ep_ranks, tp_ep_ranks in set(everyone):
        per_node = _split_by_node(sorted(ep_ranks), ranks_per_node)
        sizes = {len(ranks) for ranks in per_node}
        if len(sizes) != 1:
            raise ConfigError(
                f"parallel.ranks_per_node={ranks_per_node}: the EP group {list(ep_ranks)} has "
                f"{sorted(len(r) for r in per_node)} ranks on its nodes; nodes must hold equal "
                "shares of every EP group (make EP a multiple or a divisor of the ranks per "
                "node / TP)")
        if len(per_node) == 1:
            continue
        tp_ep_per_node = _split_by_node(sorted(tp_ep_ranks), ranks_per_node)
        etp = len(tp_ep_ranks) // len(ep_ranks)
        if any(len(r) != etp * len(per_node[0]) for r in tp_ep_per_node):
            raise ConfigError(f"parallel.ranks_per_node={ranks_per_node}: must be a multiple "
                              f"of the tensor-parallel size {etp} (a TP group on one node)")
        groups.update(tuple(r) for r in per_node)
        groups.update(tuple(r) for r in zip(*per_node))
        groups.update(tuple(r) for r in tp_ep_per_node)
    rank = dist.get_rank()
    created = {ranks: dist.new_group(list(ranks)) for ranks in sorted(groups)}
    ep_ranks = sorted(mine[0])
    per_node = _split_by_node(ep_ranks, ranks_per_node)
    node = next(n for n, ranks in enumerate(per_node) if rank in ranks)
    local_index = per_node[node].index(rank)
    if len(per_node) == 1:
        _NODE_GROUPS = NodeGroups(1, len(ep_ranks), 0, local_index)
    else:
        tp_ep_node = next(r for r in _split_by_node(sorted(mine[1]), ranks_per_node) if rank in r)
        _NODE_GROUPS = NodeGroups(
            len(per_node), len(per_node[0]), node, local_index,
            inter_node=created[tuple(ranks[local_index] for ranks in per_node)],
            intra_node=created[tuple(per_node[node])],
            intra_node_tp_ep=created[tuple(tp_ep_node)])
    return _NODE_GROUPS


def node_groups() -> NodeGroups:
    """This rank's :class:`NodeGroups` (set up by ``initialize_parallel``)."""
    if _NODE_GROUPS is None:
        raise RuntimeError("node groups are not set up: start the job with "
                           "megatron_grove.runtime.initialize_parallel")
    return _NODE_GROUPS


def destroy_node_groups() -> None:
    global _NODE_GROUPS
    _NODE_GROUPS = None
