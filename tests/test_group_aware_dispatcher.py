"""GroupAwareAlltoAllDispatcher (moe.token_dispatcher_type=grove_alltoall), CPU, fp32, gloo:
the Grove layer on it equals the Grove layer on Megatron's stock all-to-all (adjugates as extra
experts) at EP = 1, 2, 4 under random and forced routings; copies per token under uniform
routing; the local expansion / reduction; unsupported layouts; end-to-end training."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from grove_layer_cases import (
    ALL_KEYS,
    CASES,
    FORCED_NAMES,
    NUM_TOKENS,
    Case,
    Run,
    assert_matches,
    forced_run,
    grove_run,
    layer_config,
    reference_of,
    run_layers,
)
from grove_reference import route
from megatron_grove.moe import ExpertLayout
from megatron_grove.moe.dispatchers import (
    GroupAwareAlltoAllDispatcher,
    VirtualExpertAlltoAllDispatcher,
)
from megatron_grove.moe.dispatchers.group_aware import (
    expand_to_local_experts,
    reduce_to_received_tokens,
)
from megatron_grove.training.metrics import read_metrics
from processes import losses, run_distributed, run_script, torchrun


def test_forced_routings_do_what_they_say():
    _, idle = reference_of(forced_run("rank_idle", "alltoall"))
    assert idle.tokens_per_expert[4:].sum() == 0
    _, one_group = reference_of(forced_run("one_group", "alltoall"))
    assert one_group.adjugate_evaluations == NUM_TOKENS  # a single group per token
    _, uneven = reference_of(forced_run("uneven", "alltoall"))
    assert uneven.tokens_per_expert[:2].sum() >= 2 * NUM_TOKENS * 3 // 4 - 2


def _ranks_hit(run: Run, ep: int) -> int:
    """(token, EP rank) pairs of the run's routing, from the reference router."""
    local = run.case.experts // ep
    return sum(len({e // local for e, _ in route(run.weights.router @ token, run.case.topk,
                                                  run.case.score_function, run.expert_bias)})
               for token in run.x)


# --------------------------------------------------------------------------------------
# the layer on the group-aware dispatcher vs on the stock one
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("ep", (1, 2, 4))
def test_matches_stock_dispatcher(ep):
    """Outputs, input/router/expert/adjugate gradients equal the Grove layer on Megatron's
    all-to-all (1e-6) and the plain-torch reference (1e-5); the same expert and adjugate
    evaluations; one row per (token, EP rank)."""
    random_runs = [grove_run(case, d) for case in CASES if case.groups % ep == 0
                   for d in ("grove_alltoall", "alltoall")]
    forced_runs = [forced_run(name, d) for name in FORCED_NAMES
                   for d in ("grove_alltoall", "alltoall")]
    runs = random_runs + forced_runs
    results = run_layers(runs, ep=ep)
    for i in range(0, len(runs), 2):
        run, ours, stock = runs[i], results[i], results[i + 1]
        name = f"{run.case.id} {i}"
        expected = reference_of(run)[0]
        assert_matches(ours, stock, ALL_KEYS, rel=1e-6)
        assert_matches(ours, expected, ALL_KEYS, rel=1e-5)
        for key in ("routed_rows", "adjugate_rows"):
            assert ours["counters"][key] == stock["counters"][key], name
        assert ours["counters"]["dispatched_rows"] == _ranks_hit(run, ep), name
        # stock: a row per (token, expert) and per (token, group)
        assert stock["counters"]["dispatched_rows"] == (stock["counters"]["routed_rows"]
                                                        + stock["counters"]["adjugate_rows"])
    idle = results[len(random_runs)]  # rank_idle, ours
    for rank, counters in enumerate(idle["rank_counters"]):
        if rank >= max(1, ep // 2):  # ranks holding experts 4..7
            assert (counters["routed_rows"], counters["adjugate_rows"]) == (0, 0)
    assert idle["expert_fc1"][4:].abs().max() == 0
    assert idle["adjugate_fc1"][2:].abs().max() == 0


# --------------------------------------------------------------------------------------
# copies per token under uniform routing (E=128, k=8, G=64)
# --------------------------------------------------------------------------------------

E, K, G, TOKENS_PER_RANK = 128, 8, 64, 2048


def _uniform_copies(rank: int) -> dict[str, int]:
    """Rows sent by the group-aware and the virtual-expert dispatchers for the same uniformly
    drawn top-k routing of this rank's tokens."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    run = Run(Case(E, K, G, "softmax"), "grove_alltoall", None, None, None, adjugate_scale=0.05)
    config = layer_config(run, ep)
    layout = ExpertLayout(E, G, ep, 0.05)
    gen = torch.Generator().manual_seed(rank)
    chosen = torch.rand(TOKENS_PER_RANK, E, generator=gen).topk(K).indices
    routing_map = torch.zeros(TOKENS_PER_RANK, E, dtype=torch.bool).scatter(1, chosen, True)
    probs = torch.where(routing_map, 0.5 + torch.rand(TOKENS_PER_RANK, E, generator=gen), 0.0)
    hidden = torch.randn(TOKENS_PER_RANK, 1, 4, generator=gen)
    pg_collection = get_default_pg_collection()
    ours = GroupAwareAlltoAllDispatcher(config, layout, rank, pg_collection=pg_collection)
    rows, weights = ours.dispatch_preprocess(hidden, routing_map, probs)
    virtual = VirtualExpertAlltoAllDispatcher(config, layout, rank, pg_collection=pg_collection)
    virtual_rows, _ = virtual.dispatch_preprocess(hidden, routing_map, probs)
    assert (ours.rows_sent, virtual.rows_sent) == (rows.shape[0], virtual_rows.shape[0])
    return {"group_aware": rows.shape[0], "weights_shape": tuple(weights.shape),
            "virtual": virtual_rows.shape[0]}


@pytest.mark.parametrize("ep, expected", ((2, 1.99), (4, 3.63)))
def test_copies_per_token_uniform_routing(ep, expected):
    results = run_distributed(_uniform_copies, world_size=ep, expert_parallel=ep)
    tokens = TOKENS_PER_RANK * ep
    local = E // ep
    p_hit = 1 - math.comb(E - local, K) / math.comb(E, K)  # a given rank gets the token
    assert abs(ep * p_hit - expected) < 0.005
    # ranks hit = sum of ep indicators, negatively correlated: variance <= ep p (1 - p)
    tolerance = 5 * math.sqrt(ep * p_hit * (1 - p_hit) / tokens)
    ours = sum(r["group_aware"] for r in results) / tokens
    virtual = sum(r["virtual"] for r in results) / tokens
    assert abs(ours - ep * p_hit) < tolerance, (ours, ep * p_hit, tolerance)
    groups_hit = G * (1 - math.comb(E - E // G, K) / math.comb(E, K))  # 7.78
    assert abs(virtual - (K + groups_hit)) < 5 * math.sqrt(groups_hit / tokens)
    assert ours <= virtual / 4
    assert all(r["weights_shape"] == (r["group_aware"], local) for r in results)


# --------------------------------------------------------------------------------------
# the local expansion and reduction
# --------------------------------------------------------------------------------------


def test_expand_and_reduce_by_hand():
    # 3 received rows, 4 local experts in 2 groups of 2
    weights = torch.tensor([[0.5, 0.0, 0.0, 0.25],
                            [0.0, 0.0, 0.0, 0.0],
                            [0.125, 0.25, 0.0, 0.5]])
    routed = torch.arange(5.0).unsqueeze(1)  # already weighted by the experts
    adjugate = 10 * torch.arange(1.0, 5.0).unsqueeze(1)  # A_g(x) of the 4 (row, group) pairs
    # adjugate weights lam x group sums: row 0: 0.25, 0.125; row 2: 0.1875, 0.25
    expected = [0 + 3 + 0.25 * 10 + 0.125 * 30, 0.0, 1 + 2 + 4 + 0.1875 * 20 + 0.25 * 40]
    for scale in (None, 0.5):  # adjugates weighed by the combine / by their bank's probs
        ex = expand_to_local_experts(weights, experts_per_group=2, adjugate_scale=scale)
        assert ex.adjugates_weighted == (scale is not None)
        assert ex.routed_rows.tolist() == [0, 2, 2, 0, 2]  # experts 0: rows 0, 2; 1: 2; 3: 0, 2
        assert ex.routed_probs.tolist() == [0.5, 0.125, 0.25, 0.25, 0.5]
        assert ex.tokens_per_expert.tolist() == [2, 1, 0, 2]
        assert ex.adjugate_rows.tolist() == [0, 2, 0, 2]  # group 0: rows 0, 2; group 1: 0, 2
        assert ex.adjugate_groups.tolist() == [0, 0, 1, 1]
        assert ex.tokens_per_adjugate.tolist() == [2, 2]
        assert ex.adjugate_probs.tolist() == ([1.0] * 4 if scale is None
                                              else [0.25, 0.1875, 0.125, 0.25])
        bank_output = adjugate * ex.adjugate_probs.unsqueeze(1)  # what the adjugate bank returns
        for backend in ("torch", "triton"):
            out = reduce_to_received_tokens(routed, bank_output, ex, weights,
                                            experts_per_group=2, adjugate_scale=0.5,
                                            backend=backend)
            assert out.squeeze(1).tolist() == expected, (scale, backend)


# --------------------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_training_matches_stock_alltoall(tmp_path):
    """8 steps of the tiny Grove model at EP=2 (torchrun): the same losses as the stock
    dispatcher, fewer copies per token, the same expert / adjugate evaluations."""
    logs = {}
    for dispatcher in ("grove_alltoall", "alltoall"):
        logs[dispatcher] = tmp_path / dispatcher
        torchrun("parallel.expert_model_parallel_size=2", f"logging.dir={logs[dispatcher]}",
                 f"moe.token_dispatcher_type={dispatcher}")
    ours, stock = losses(logs["grove_alltoall"]), losses(logs["alltoall"])
    assert ours.keys() == stock.keys() == set(range(1, 9))
    assert all(abs(ours[s] - stock[s]) <= 1e-5 for s in ours), (ours, stock)
    for a, b in zip(read_metrics(logs["grove_alltoall"] / "metrics.jsonl"),
                    read_metrics(logs["alltoall"] / "metrics.jsonl")):
        assert len(a["copies_sent_per_token"]) == 2  # one value per MoE layer
        for layer in range(2):
            assert a["routed_evals_per_token"][layer] == b["routed_evals_per_token"][layer] == 2
            assert a["adjugate_evals_per_token"][layer] == b["adjugate_evals_per_token"][layer]
            assert 1 <= a["copies_sent_per_token"][layer] <= 2  # at most once per EP rank
            assert b["copies_sent_per_token"][layer] == pytest.approx(
                b["routed_evals_per_token"][layer] + b["adjugate_evals_per_token"][layer])


@pytest.mark.e2e
def test_tensor_parallel_training_matches_stock_alltoall(tmp_path):
    """TP=2 (sequence parallel) x EP=2, 4 processes: Megatron's TP gather of the received rows
    and their weights, TP-split experts and adjugates; the same losses as the stock dispatcher
    at the same layout (the initialisation depends on the TP size, not on the dispatcher)."""
    logs = {}
    for dispatcher in ("grove_alltoall", "alltoall"):
        logs[dispatcher] = tmp_path / dispatcher
        torchrun("parallel.expert_model_parallel_size=2", "parallel.tensor_model_parallel_size=2",
                 "parallel.sequence_parallel=true", "train.iters=4",
                 f"moe.token_dispatcher_type={dispatcher}", f"logging.dir={logs[dispatcher]}",
                 nproc=4)
    ours, stock = losses(logs["grove_alltoall"]), losses(logs["alltoall"])
    assert ours.keys() == stock.keys() == set(range(1, 5))
    for step in ours:
        assert ours[step] == pytest.approx(stock[step], rel=1e-6, abs=0), (ours, stock)


# --------------------------------------------------------------------------------------
# benchmarks/dispatch.py
# --------------------------------------------------------------------------------------

def _benchmark(*flags: str) -> subprocess.CompletedProcess:
    return run_script("benchmarks/dispatch.py", *flags, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.e2e
def test_benchmark_json():
    proc = _benchmark("--ep", "2", "--experts", "16", "--topk", "4", "--groups", "8",
                      "--tokens", "128", "--hidden", "32", "--iters", "1", "--warmup", "0",
                      "--json", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    copies, adjugate = out["copies_per_token"], out["adjugate_evals_per_token"]
    assert copies["alltoall"] == 4  # one row per (token, expert)
    assert adjugate["alltoall_virtual_adjugates"] == adjugate["group_aware"]
    assert copies["alltoall_virtual_adjugates"] == pytest.approx(4 + adjugate["group_aware"])
    assert 1 <= copies["group_aware"] <= 2  # at most once per EP rank
    # (d) hierarchical on one node (no torchrun, no parallel.ranks_per_node) is (c)
    assert copies["hierarchical"] == copies["group_aware"]
    assert out["bytes_per_token"]["hierarchical"] == out["bytes_per_token"]["group_aware"]
    # bytes: H=32 fp32 per row, plus one routing weight (stock) or E/ep = 8 weights (ours)
    assert out["bytes_per_token"]["alltoall"] == 4 * (32 + 1) * 4
    assert out["bytes_per_token"]["group_aware"] == pytest.approx(copies["group_aware"] * 40 * 4)
    times = out["time_s"]
    assert out["time_ratio_group_aware_vs_virtual"] == pytest.approx(
        times["group_aware"] / times["alltoall_virtual_adjugates"])


@pytest.mark.e2e
def test_benchmark_rejects_bad_layout():
    proc = _benchmark("--ep", "4", "--experts", "16", "--groups", "2")
    assert proc.returncode == 2
    assert "--groups 2 must divide --experts 16 and be a multiple of --ep 4" in proc.stderr
