"""GroveHierarchicalDispatcher (moe.token_dispatcher_type=grove_hierarchical), CPU, fp32, gloo,
nodes emulated by groups of ranks (parallel.ranks_per_node): the Grove layer on it equals the
Grove layer on grove_alltoall (outputs and gradients, 1e-6) at EP=4 as 2 nodes x 2, EP=8 as
2 x 4 and 4 x 2, with a node and a rank that receive no token; one row per (token, node)
across nodes; link counters against the analytic formula under uniform routing; one node is
grove_alltoall; end-to-end training with TP=2 and the distributed optimizer."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from grove_reference import route
from helpers import (
    ALL_KEYS,
    CASES,
    Case,
    Run,
    assert_matches,
    forced_run,
    grove_run,
    layer_config,
    losses,
    run_distributed,
    run_layers,
    torchrun,
)
from megatron_grove.moe import ExpertLayout
from megatron_grove.moe.dispatchers import GroveHierarchicalDispatcher
from megatron_grove.runtime.node_groups import node_groups
from megatron_grove.training.metrics import read_metrics


def _nodes_hit(run: Run, nodes: int) -> int:
    """(token, node) pairs of the run's routing, from the reference router."""
    per_node = run.case.experts // nodes
    return sum(len({e // per_node for e, _ in route(run.weights.router @ token, run.case.topk,
                                                     run.case.score_function, run.expert_bias)})
               for token in run.x)


def _compare(runs: list[Run], results: list[dict], nodes: int) -> None:
    """Pairs (hierarchical, grove_alltoall) of ``runs``: equal outputs, gradients and compute;
    one dispatched row per (token, destination node)."""
    for i in range(0, len(runs), 2):
        run, ours, flat = runs[i], results[i], results[i + 1]
        assert_matches(ours, flat, ALL_KEYS, rel=1e-6)
        for key in ("routed_rows", "adjugate_rows"):
            assert ours["counters"][key] == flat["counters"][key], (run.case.id, key)
        assert ours["counters"]["dispatched_rows"] == _nodes_hit(run, nodes), run.case.id


def _pairs(cases, forced) -> list[Run]:
    return ([grove_run(case, d) for case in cases for d in ("grove_hierarchical", "grove_alltoall")]
            + [forced_run(name, d) for name in forced
               for d in ("grove_hierarchical", "grove_alltoall")])


def test_equals_group_aware_two_nodes_of_two():
    """EP=4 as 2 x 2: every case, and the forced routings: ``rank_idle`` (node 1 receives no
    token), ``alternate_groups`` (ranks 1 and 3 receive none, their nodes do)."""
    runs = _pairs([c for c in CASES if c.groups % 4 == 0],
                  ("rank_idle", "alternate_groups", "uneven"))
    results = run_layers(runs, ep=4, ranks_per_node=2)
    _compare(runs, results, nodes=2)
    idle_node = results[-6]["rank_counters"]  # rank_idle on grove_hierarchical
    assert [c["routed_rows"] for c in idle_node][2:] == [0, 0]
    idle_ranks = results[-4]["rank_counters"]  # alternate_groups
    assert [c["routed_rows"] > 0 for c in idle_ranks] == [True, False, True, False]
    # nothing crosses to node 1; every token of node 1 crosses to node 0 once
    assert results[-6]["counters"]["internode_rows"] == 16


@pytest.mark.parametrize("ranks_per_node", (4, 2), ids=("2x4", "4x2"))
def test_equals_group_aware_eight_ranks(ranks_per_node):
    """EP=8 as 2 x 4 and 4 x 2 (the cases with whole groups on 8 ranks: E=16, G=8)."""
    runs = _pairs([c for c in CASES if c.groups % 8 == 0], ())
    _compare(runs, run_layers(runs, ep=8, ranks_per_node=ranks_per_node), nodes=8 // ranks_per_node)
