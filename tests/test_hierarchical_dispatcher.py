"""GroveHierarchicalDispatcher (moe.token_dispatcher_type=grove_hierarchical), CPU, fp32, gloo,
nodes emulated by groups of ranks (parallel.ranks_per_node): the Grove layer on it equals the
Grove layer on grove_alltoall (outputs and gradients, 1e-6) at EP=4 as 2 nodes x 2, EP=8 as
2 x 4 and 4 x 2, with a node and a rank that receive no token; one row per (token, node)
across nodes; link counters against the analytic formula under uniform routing; one node is
grove_alltoall; end-to-end training with the distributed optimizer and with TP=2."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from config_builders import HIDDEN
from grove_reference import GroveWeights, route
from grove_layer_cases import (
    ADJUGATE_FFN,
    FFN,
    NUM_TOKENS,
    ALL_KEYS,
    CASES,
    Case,
    Run,
    assert_matches,
    forced_run,
    grove_run,
    layer_config,
    run_layers,
)
from processes import losses, run_distributed, torchrun
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


def _wide_run(dispatcher: str) -> Run:
    """E=32, k=2, G=8: a node's 8 or 16 experts cross nodes as 2 (weight, column) pairs
    (:class:`SelectedWeightsAlltoAll`), where the cases' nodes hold at most 2k experts."""
    weights = GroveWeights.random(32, 8, HIDDEN, FFN, ADJUGATE_FFN, seed=21)
    gen = torch.Generator().manual_seed(22)
    x, cotangent = (torch.randn(NUM_TOKENS, HIDDEN, generator=gen) for _ in range(2))
    return Run(Case(32, 2, 8, "softmax"), dispatcher, weights, x, cotangent, adjugate_scale=0.25)


def _pairs(cases, forced) -> list[Run]:
    return ([grove_run(case, d) for case in cases for d in ("grove_hierarchical", "grove_alltoall")]
            + [_wide_run(d) for d in ("grove_hierarchical", "grove_alltoall")]
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


def test_one_node_is_group_aware():
    """With the EP group on one node there is no stage 1: the same code as grove_alltoall,
    bitwise the same results and counters."""
    runs = _pairs([CASES[0]], ("rank_idle",))
    results = run_layers(runs, ep=2)
    for ours, flat in zip(results[::2], results[1::2]):
        for key in ALL_KEYS:
            assert torch.equal(ours[key], flat[key]), key
        assert ours["counters"] == flat["counters"]
        assert ours["counters"]["internode_rows"] == 0


# --------------------------------------------------------------------------------------
# link counters under uniform routing (E=128, k=8, G=64)
# --------------------------------------------------------------------------------------

E, K, G, TOKENS_PER_RANK = 128, 8, 64, 2048


def _uniform_link_rows(rank: int) -> dict[str, tuple[int, int, int]]:
    """(rows sent, rows to other nodes, rows to other ranks of the node) of the hierarchical
    and the flat group-aware dispatch of the same uniformly drawn top-k routing."""
    from megatron_grove.moe.dispatchers import GroupAwareAlltoAllDispatcher

    ep = parallel_state.get_expert_model_parallel_world_size()
    config = layer_config(Run(Case(E, K, G, "softmax"), "grove_hierarchical", None, None, None,
                              adjugate_scale=0.05), ep)
    layout = ExpertLayout(E, G, ep, 0.05)
    gen = torch.Generator().manual_seed(rank)
    chosen = torch.rand(TOKENS_PER_RANK, E, generator=gen).topk(K).indices
    routing_map = torch.zeros(TOKENS_PER_RANK, E, dtype=torch.bool).scatter(1, chosen, True)
    probs = torch.where(routing_map, 0.5 + torch.rand(TOKENS_PER_RANK, E, generator=gen), 0.0)
    hidden = torch.randn(TOKENS_PER_RANK, 1, 4, generator=gen)
    out = {}
    for name, cls in (("hierarchical", GroveHierarchicalDispatcher),
                      ("flat", GroupAwareAlltoAllDispatcher)):
        dispatcher = cls(config, layout, rank, pg_collection=get_default_pg_collection())
        dispatcher.token_dispatch(*dispatcher.dispatch_preprocess(hidden, routing_map, probs))
        out[name] = (dispatcher.rows_sent, *dispatcher.link_rows())
    assert node_groups().nodes == 2
    return out


def test_link_counters_match_the_formula_under_uniform_routing():
    """EP=4 as 2 x 2, 8192 tokens: rows sent and the rows crossing nodes / staying on the node
    within 2% of each strategy's analytic figures (its entry in the table of strategies); the
    hierarchical dispatch crosses nodes about half as often as the flat one."""
    from megatron_grove.moe.dispatchers import GROVE_DISPATCHERS

    results = run_distributed(_uniform_link_rows, world_size=4, expert_parallel=4,
                              ranks_per_node=2)
    tokens = 4 * TOKENS_PER_RANK
    measured = {name: [sum(r[name][i] for r in results) / tokens for i in range(3)]
                for name in ("hierarchical", "flat")}
    for name, strategy in (("hierarchical", "grove_hierarchical"), ("flat", "grove_alltoall")):
        cost = GROVE_DISPATCHERS[strategy].expected_copies(E, K, G, ep=4, nodes=2)
        for value, expected in zip(measured[name], (cost.copies, cost.internode, cost.intranode)):
            assert value == pytest.approx(expected, rel=0.02), (name, measured[name], cost)
    assert measured["hierarchical"][1] < 0.6 * measured["flat"][1]


def test_node_layout_errors_are_one_line():
    from megatron_grove.config import ConfigError
    from megatron_grove.runtime.node_groups import resolve_ranks_per_node

    assert resolve_ranks_per_node(None, 8) == 8  # no torchrun: one node
    assert resolve_ranks_per_node(4, 8) == 4
    with pytest.raises(ConfigError, match=r"^parallel.ranks_per_node=3: must divide the world "
                                          r"size 8 \(ranks per node; default: torchrun's "
                                          r"LOCAL_WORLD_SIZE\)$"):
        resolve_ranks_per_node(3, 8)


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------

TWO_NODES = ("parallel.expert_model_parallel_size=2", "parallel.ranks_per_node=1",
             "parallel.use_distributed_optimizer=true", "train.iters=20")


def _train(log: Path, *overrides: str, nproc: int = 2) -> dict[int, float]:
    torchrun(*overrides, f"logging.dir={log}", nproc=nproc)
    return losses(log)


@pytest.mark.e2e
def test_training_and_checkpoints_match_group_aware(tmp_path):
    """EP=2 on 2 nodes of 1 rank, the distributed optimizer: 20 steps on grove_hierarchical have
    grove_alltoall's losses, grove_alltoall's checkpoint of step 10 resumes on
    grove_hierarchical to the same losses, and the link counters are logged per layer."""
    ours = _train(tmp_path / "hierarchical", *TWO_NODES, "moe.token_dispatcher_type=auto")
    flat = _train(tmp_path / "flat", *TWO_NODES, "moe.token_dispatcher_type=grove_alltoall",
                  "train.exit_at_iter=10", f"checkpoint.save={tmp_path / 'ckpt'}")
    resumed = _train(tmp_path / "resumed", *TWO_NODES,
                     "moe.token_dispatcher_type=grove_hierarchical",
                     f"checkpoint.save={tmp_path / 'ckpt'}")
    assert ours.keys() == set(range(1, 21))
    assert flat.keys() == set(range(1, 11)) and resumed.keys() == set(range(11, 21))
    for step, loss in {**flat, **resumed}.items():
        assert ours[step] == pytest.approx(loss, rel=1e-6, abs=0), (step, ours, flat, resumed)
    for record in read_metrics(tmp_path / "hierarchical" / "metrics.jsonl"):
        internode, intranode = (record["internode_copies_per_token"],
                                record["intranode_copies_per_token"])
        assert len(internode) == len(intranode) == 2  # one value per MoE layer
        # one EP rank per node: a token crosses to the other node at most once, never inside
        assert all(0 < value <= 1 for value in internode) and intranode == [0.0, 0.0]


@pytest.mark.e2e
def test_tensor_parallel_training_matches_group_aware(tmp_path):
    """TP=2 (sequence parallel) x EP=2 on 4 processes, nodes of 2 ranks (each EP group on 2
    nodes, each TP pair on one): stage 2 gathers the rows over TP; the losses of
    grove_alltoall."""
    tp2 = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
           "parallel.expert_model_parallel_size=2", "parallel.ranks_per_node=2", "train.iters=4")
    ours, flat = (_train(tmp_path / d, *tp2, f"moe.token_dispatcher_type={d}", nproc=4)
                  for d in ("grove_hierarchical", "grove_alltoall"))
    assert ours.keys() == flat.keys() == set(range(1, 5))
    for step in ours:
        assert ours[step] == pytest.approx(flat[step], rel=1e-6, abs=0), (ours, flat)


def test_layout_refuses_ranks_per_node_not_dividing_the_world():
    from megatron_grove.config import ConfigError, load_config, validate_layout

    cfg = load_config(None, ["parallel.ranks_per_node=3", "moe.num_expert_groups=4"])
    with pytest.raises(ConfigError, match=r"^parallel.ranks_per_node=3: must divide the world "
                                          r"size 4 "):
        validate_layout(cfg, 4)
    assert validate_layout(load_config(None, ["parallel.ranks_per_node=2"]), 4) == 4
