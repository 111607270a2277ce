"""GroveMoELayer (CPU, fp32, gloo): against the plain-torch reference, across expert-parallel
sizes and both stock dispatchers, against Megatron's MoELayer when the adjugates vanish, with an
EP rank that receives no tokens; the layer spec wiring; the Grove config validation."""

from __future__ import annotations

import dataclasses
import functools
import pickle
from typing import Any

import pytest
import torch

from config_builders import HIDDEN
from grove_layer_cases import (
    ADJUGATE_FFN,
    ALL_KEYS,
    CASES,
    DISPATCHERS,
    FFN,
    NUM_TOKENS,
    Case,
    Run,
    assert_matches,
    case_data,
    grove_run,
    reference,
    run_layers,
)
from grove_reference import GroveWeights, grove_forward
from megatron_grove.config import ConfigError, load_config, validate_layout
from megatron_grove.megatron_config import to_transformer_config
from megatron_grove.model import build_gpt_model
from megatron_grove.moe import ExpertLayout
from megatron_grove.moe.dispatchers.virtual_experts import extend_to_virtual_experts
from processes import run_distributed

# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


@functools.cache
def ep1_results(dispatcher: str) -> tuple[dict[str, Any], ...]:
    return tuple(run_layers([grove_run(case, dispatcher) for case in CASES], ep=1))


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_matches_reference_at_ep1(dispatcher):
    for case, result in zip(CASES, ep1_results(dispatcher)):
        expected, routed, adjugate = reference(case)
        assert_matches(result, expected, ALL_KEYS, rel=1e-5)
        # a copy per virtual expert (alltoall); every token to the one rank (allgather)
        copies = routed + adjugate if dispatcher == "alltoall" else NUM_TOKENS
        assert result["counters"] == {"dispatched_rows": copies, "routed_rows": routed,
                                      "adjugate_rows": adjugate, "internode_rows": 0,
                                      "intranode_rows": 0, "forwards": 1}, case.id


def test_tokens_within_one_group_evaluate_its_adjugate_once():
    """The data force tokens whose k selected experts share a group: the adjugate evaluations
    (token rows through adjugates) are the (token, group) pairs, fewer than (token, expert)."""
    for case in CASES:
        if case.topk > 1:
            _, routed, adjugate = reference(case)
            assert adjugate < routed, case.id
    case = CASES[0]  # E=8, k=2, G=4: a focused token selects both experts of its group
    weights, bias, x, _ = case_data(case)
    groups = torch.topk(torch.sigmoid(x @ weights.router.T) + bias, case.topk).indices // 2
    assert (groups[:, 0] == groups[:, 1]).sum() >= NUM_TOKENS // 4


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("ep", (2, 4))
def test_expert_parallel_matches_ep1(ep, dispatcher):
    cases = [case for case in CASES if case.groups % ep == 0]
    results = run_layers([grove_run(case, dispatcher) for case in cases], ep=ep)
    baseline = dict(zip(CASES, ep1_results(dispatcher)))
    for case, result in zip(cases, results):
        assert_matches(result, baseline[case], ALL_KEYS, rel=1e-6)
        assert_matches(result, reference(case)[0], ALL_KEYS, rel=1e-5)
        assert result["counters"]["routed_rows"] == baseline[case]["counters"]["routed_rows"]
        assert result["counters"]["adjugate_rows"] == baseline[case]["counters"]["adjugate_rows"]


@pytest.mark.parametrize("ep", (1, 2))
def test_vanishing_adjugates_equal_megatron_moe_layer(ep):
    """lam = 0, or adjugate down-projections at zero: Megatron's MoELayer (stock TopKRouter)
    with the same weights gives the same output and gradients."""
    keys = ("y", "x_grad", "router", "expert_fc1", "expert_fc2")
    runs = []
    for dispatcher in DISPATCHERS:
        for case in (c for c in CASES if c.groups % ep == 0):
            weights = case_data(case)[0]
            zero_down = dataclasses.replace(weights,
                                            adjugate_fc2=torch.zeros_like(weights.adjugate_fc2))
            runs += [grove_run(case, dispatcher, expert_bias=None, stock=True),
                     grove_run(case, dispatcher, expert_bias=None, adjugate_scale=0.0),
                     grove_run(case, dispatcher, expert_bias=None, weights=zero_down)]
    results = run_layers(runs, ep=ep)
    for i in range(0, len(runs), 3):
        stock, lam_zero, zero_down = results[i:i + 3]
        assert_matches(lam_zero, stock, keys, rel=1e-6)
        assert_matches(zero_down, stock, keys, rel=1e-6)
        assert zero_down["adjugate_fc1"].abs().max() == 0


@pytest.mark.parametrize("score_function", ("softmax", "sigmoid"))
def test_ep_rank_without_tokens(score_function):
    """All tokens of both ranks select rank 0's experts: rank 1 computes nothing and the
    output and gradients still match the reference."""
    case = Case(8, 2, 4, score_function)
    weights = GroveWeights.random(8, 4, HIDDEN, FFN, ADJUGATE_FFN, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    x[:, 0] = 4.0
    weights.router[:4, 0], weights.router[4:, 0] = 0.0, -12.0  # experts 4..7 live on rank 1
    cotangent = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    runs = [Run(case, dispatcher, weights, x, cotangent, adjugate_scale=0.5)
            for dispatcher in DISPATCHERS]
    w = GroveWeights(*(t.clone() for t in dataclasses.astuple(weights))).requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = grove_forward(x_ref, w, 2, 4, 0.5, score_function)
    (out.y * cotangent).sum().backward()
    expected = {"y": out.y.detach(), "x_grad": x_ref.grad, **w.grads()}
    assert out.tokens_per_expert[4:].sum() == 0
    for result in run_layers(runs, ep=2):
        computed = {k: result["rank_counters"][1][k] for k in ("routed_rows", "adjugate_rows")}
        assert computed == {"routed_rows": 0, "adjugate_rows": 0}
        assert_matches(result, expected, ALL_KEYS, rel=1e-5)
        assert result["expert_fc1"][4:].abs().max() == 0
        assert result["adjugate_fc1"][2:].abs().max() == 0


def test_expert_layout_and_virtual_columns():
    layout = ExpertLayout(num_experts=8, num_groups=4, ep_size=2, adjugate_scale=0.5)
    assert (layout.local_experts, layout.local_adjugates, layout.experts_per_group) == (4, 2, 2)
    probs = torch.zeros(1, 8)
    probs[0, 2], probs[0, 3], probs[0, 4] = 0.5, 0.25, 0.25  # groups 1, 1, 2
    virtual_probs, virtual_map = extend_to_virtual_experts(layout, probs, probs > 0)
    #                        rank 0: experts 0-3, adjugates 0-1 | rank 1: experts 4-7, adj. 2-3
    assert virtual_probs[0].tolist() == [0, 0, .5, .25, 0, .375, .25, 0, 0, 0, .125, 0]
    assert virtual_map[0].tolist() == [bool(v) for v in virtual_probs[0].tolist()]
    with pytest.raises(ValueError, match="must divide num_moe_experts"):
        ExpertLayout(8, 3, 1, 0.1)
    with pytest.raises(ValueError, match="must divide moe_num_expert_groups"):
        ExpertLayout(8, 2, 4, 0.1)


def _model_wiring(rank: int) -> bytes:
    """A 2-layer GPT (dense, then Grove MoE: E=4, G=2) at EP=2: forward/backward, the layer
    types, state_dict keys and the sharded (checkpoint) view of bias and adjugates."""
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32",
                             "model.num_attention_heads=2", "model.ffn_hidden_size=64",
                             "moe.first_k_dense_layers=1", "moe.num_experts=4",
                             "moe.num_expert_groups=2", "moe.ffn_hidden_size=16",
                             "moe.adjugate_ffn_hidden_size=8", "moe.adjugate_scale=0.5",
                             "parallel.expert_model_parallel_size=2"])
    model = build_gpt_model(to_transformer_config(cfg), vocab_size=64, seq_length=8)
    mlps = [layer.mlp for layer in model.decoder.layers]
    tokens = torch.randint(0, 64, (2, 8))
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    loss = model(tokens, torch.arange(8).expand(2, 8), mask, labels=tokens)
    loss.sum().backward()
    sharded = {t.key: (tuple(t.global_shape), t.global_offset)
               for t in model.sharded_state_dict().values()
               if getattr(t, "key", "").endswith(("expert_bias", "adjugate_experts.experts."
                                                                 "linear_fc2.weight"))}
    adjugate_fc1 = mlps[1].adjugate_experts.local_experts[0].linear_fc1.weight
    return pickle.dumps({"mlp_types": [type(m).__name__ for m in mlps],
                         "router": type(mlps[1].router).__name__,
                         "keys": [k for k in model.state_dict() if "layers.1.mlp" in k],
                         "sharded": sharded, "counters": mlps[1].grove_counters,
                         "adjugate_trained": bool(adjugate_fc1.grad.abs().sum() > 0)})


def test_layer_spec_builds_grove_layers():
    for rank, result in enumerate(map(pickle.loads, run_distributed(
            _model_wiring, world_size=2, expert_parallel=2))):
        assert result["mlp_types"] == ["MLP", "GroveMoELayer"]
        assert result["router"] == "GroveTopKRouter"
        prefix = "decoder.layers.1.mlp."
        assert prefix + "router.expert_bias" in result["keys"]
        assert prefix + "adjugate_experts.local_experts.0.linear_fc2.weight" in result["keys"]
        assert result["sharded"] == {  # one adjugate per rank: group `rank` of 2
            prefix + "router.expert_bias": ((4,), (0,)),
            prefix + "adjugate_experts.experts.linear_fc2.weight": ((2, 32, 8), (rank, 0, 0))}
        assert result["counters"]["forwards"] == 1
        assert result["adjugate_trained"]


# --------------------------------------------------------------------------------------
# config validation (config.py)
# --------------------------------------------------------------------------------------


def test_config_rejects_groups_not_dividing_experts():
    with pytest.raises(ConfigError, match=r"moe.num_expert_groups=3: must divide "
                                          r"moe.num_experts=8 \(allowed: 1, 2, 4, 8\)"):
        load_config(None, ["moe.num_experts=8", "moe.num_expert_groups=3"])


def test_config_rejects_adjugate_scale_above_g_over_e():
    overrides = ["moe.num_experts=8", "moe.num_expert_groups=2", "moe.adjugate_scale=0.3"]
    with pytest.raises(ConfigError, match=r"moe.adjugate_scale=0.3: the paper requires "
                                          r"lam <= G/E = 0.25"):
        load_config(None, overrides)
    assert load_config(None, overrides + ["moe.allow_large_adjugate_scale=true"])
    assert load_config(None, overrides[:2] + ["moe.adjugate_scale=0.25"])


def test_layout_rejects_ep_not_dividing_groups():
    cfg = load_config(None, ["moe.num_experts=8", "moe.num_expert_groups=2",
                             "parallel.expert_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"parallel.expert_model_parallel_size=4: must divide "
                                          r"moe.num_expert_groups=2"):
        validate_layout(cfg, world_size=4)
    cfg.moe.num_expert_groups = 4
    assert validate_layout(cfg, world_size=4) == 4
