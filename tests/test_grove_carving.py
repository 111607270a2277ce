"""Carving a dense SwiGLU FFN into a Grove layer (carving/grove.py):
every neuron used once, balanced groups and experts, adjugates from each group's most active
neurons, determinism (also from the calibration forward's activations), the linear router's
targets; as our GroveMoELayer (CMoE router + groups + shared expert, CPU, fp32, gloo): every
expert active == the dense FFN, and a sparse selection == the Grove formula computed token by
token in plain torch."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from carving_reference import cmoe_router_probs, swiglu
from config_builders import transformer_config
from megatron_grove.carving.grove import GroveCarveSpec, carve_grove_ffn, grove_selection_gain
from megatron_grove.carving.grove import carved_grove_ffn_to_megatron
from megatron_grove.carving.neurons import activation_markers, activation_rates, ffn_hidden
from megatron_grove.moe import build_moe_layer
from processes import run_distributed

HIDDEN, D_FFN, TOKENS = 16, 46, 40  # 46 % 8 != 0; the groups need zero padding too
SPEC = GroveCarveSpec(shared=2, experts=8, groups=3, per_group=2, adjugate=3, active=6,
                      activation_topk=9)
PAPER = dataclasses.replace(SPEC, router="paper")


@functools.cache
def dense_case(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w_g, w_u = (torch.randn(D_FFN, HIDDEN, generator=g) / 4 for _ in range(2))
    w_d = torch.randn(HIDDEN, D_FFN, generator=g) / 6
    return w_g, w_u, w_d, torch.randn(TOKENS, HIDDEN, generator=g)


@functools.cache
def carved_case(spec: GroveCarveSpec = SPEC):
    w_g, w_u, w_d, x = dense_case()
    return carve_grove_ffn(w_g, w_u, w_d, x, spec)


def test_spec_sizes_and_checks():
    m = 6  # ceil(46 / 8); a group: 6 routed slots x 6 / 3 groups = 12 neurons = 3 + 2 x ceil(9 / 2)
    assert SPEC.shared_neurons(D_FFN) == 2 * m
    assert SPEC.neurons_per_expert(D_FFN) == 5
    assert SPEC.padded_neurons(D_FFN) == 12 + 3 * (3 + 2 * 5) >= D_FFN
    assert SPEC.adjugate_scale == 0.5 and SPEC.routed == 6
    with pytest.raises(ValueError, match="--active 7"):
        GroveCarveSpec(2, 8, 3, 2, 3, 7)
    with pytest.raises(ValueError, match="--adjugate-size 12"):
        GroveCarveSpec(2, 8, 3, 2, 12, 2).neurons_per_expert(D_FFN)


def test_every_neuron_lands_once_in_balanced_parts():
    carved = carved_case()
    routed = carved.routed
    slots = torch.cat([routed.neuron_order, carved.adjugate_neurons.flatten()])
    assert sorted(slots.tolist()) == list(range(SPEC.padded_neurons(D_FFN)))
    assert routed.expert_gate.shape == (6, 5, HIDDEN)
    assert carved.adjugate_gate.shape == (3, 3, HIDDEN)
    assert carved.adjugate_down.shape == (3, HIDDEN, 3)
    assert routed.shared_gate.shape == (12, HIDDEN)


def test_adjugates_hold_each_groups_most_active_neurons():
    w_g, w_u, _, x = dense_case()
    carved = carved_case()
    rates = activation_rates(activation_markers(ffn_hidden(x, w_g, w_u), 9))
    rates = torch.cat([rates, torch.zeros(SPEC.padded_neurons(D_FFN) - D_FFN)])
    shared = set(carved.routed.neuron_order[:12].tolist())
    assert min(rates[list(shared)]) >= max(
        rates[[j for j in range(D_FFN) if j not in shared]])
    experts = carved.routed.neuron_order[12:].reshape(3, 2 * 5)  # group-major
    for j in range(3):
        assert min(rates[carved.adjugate_neurons[j]]) >= max(rates[experts[j]])


@pytest.mark.parametrize("spec", [SPEC, PAPER], ids=["linear", "paper"])
def test_carving_is_deterministic(spec):
    w_g, w_u, w_d, x = dense_case()
    first, second = (carve_grove_ffn(w_g, w_u, w_d, x, spec) for _ in range(2))
    given = carve_grove_ffn(w_g, w_u, w_d, x, spec, hidden=ffn_hidden(x, w_g, w_u))
    a, b = carved_grove_ffn_to_megatron(first, ""), carved_grove_ffn_to_megatron(second, "")
    c = carved_grove_ffn_to_megatron(given, "")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    assert ("router.up_weight" in a) == (spec.router == "paper")
    assert ("router.score_bias" in a) == (spec.router == "linear")


def test_linear_router_targets_what_selecting_an_expert_adds():
    """The fit's target for expert e is its own activation mass plus 1/n of its group's
    adjugate mass: the rise of the token's total activated mass when e joins the selection."""
    w_g, w_u, _, x = dense_case()
    carved = carved_case()
    hidden = ffn_hidden(x, *(torch.cat([w, w.new_zeros(SPEC.padded_neurons(D_FFN) - D_FFN,
                                                       HIDDEN)]) for w in (w_g, w_u)))
    members = carved.routed.neuron_order[12:].reshape(6, 5)
    gain = grove_selection_gain(hidden, members, carved.adjugate_neurons)

    def mass(selected: list[int]) -> torch.Tensor:  # Grove weights with rho = 1, lam = 1/n
        weight = torch.zeros(hidden.shape[1])
        for e in selected:
            weight[members[e]] = 1.0
            weight[carved.adjugate_neurons[e // 2]] += 0.5
        return (hidden.abs() * weight).sum(dim=1)

    for e in range(6):
        torch.testing.assert_close(mass([e, (e + 2) % 6]) - mass([(e + 2) % 6]), gain[:, e])


def build_layer(spec: GroveCarveSpec, topk: int):
    """The carved Grove layer through the config path and :func:`build_moe_layer`."""
    return build_moe_layer(transformer_config(
        model__num_layers=1, model__hidden_size=HIDDEN, model__num_attention_heads=1,
        model__ffn_hidden_size=D_FFN, moe__num_experts=spec.routed,
        moe__ffn_hidden_size=spec.neurons_per_expert(D_FFN), moe__router_topk=topk,
        moe__router_type=spec.router.router_type, moe__num_expert_groups=spec.groups,
        moe__adjugate_ffn_hidden_size=spec.adjugate, moe__adjugate_scale=spec.adjugate_scale,
        moe__bias_update_rule="paper",
        moe__shared_expert_ffn_hidden_size=spec.shared_neurons(D_FFN) or "null"))


def _layer_worker(rank: int, spec: GroveCarveSpec, topk: int) -> dict:
    layer = build_layer(spec, topk).eval()  # eval: counters count no-grad forwards
    missing, unexpected = layer.load_state_dict(
        carved_grove_ffn_to_megatron(carved_case(spec), ""), strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        y = layer(dense_case()[3].unsqueeze(1))[0].squeeze(1)
    return {"y": y, "adjugate_rows": layer.grove_counters["adjugate_rows"]}


def run_layer(spec: GroveCarveSpec, topk: int) -> dict:
    return run_distributed(_layer_worker, world_size=1, expert_parallel=1, args=(spec, topk))[0]


def grove_reference(spec: GroveCarveSpec, topk: int) -> torch.Tensor:
    """Token by token: Shared + sum_{e in top-k} E_e + lam * sum_j k_j A_j (rho = 1)."""
    carved, x = carved_case(spec), dense_case()[3]
    r = carved.routed
    probs = cmoe_router_probs(x, r)
    rows = []
    for t in range(TOKENS):
        xt = x[t:t + 1]
        y = swiglu(xt, r.shared_gate, r.shared_up, r.shared_down)[0]
        hits = [0] * spec.groups
        for e in probs[t].topk(topk).indices.tolist():
            y = y + swiglu(xt, r.expert_gate[e], r.expert_up[e], r.expert_down[e])[0]
            hits[e // spec.per_group] += 1
        for j, k_j in enumerate(hits):
            y = y + carved.adjugate_scale * k_j * swiglu(
                xt, carved.adjugate_gate[j], carved.adjugate_up[j], carved.adjugate_down[j])[0]
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("spec", [SPEC, PAPER], ids=["linear", "paper"])
def test_every_expert_active_is_the_dense_ffn(spec):
    w_g, w_u, w_d, x = dense_case()
    got = run_layer(spec, topk=spec.routed)
    torch.testing.assert_close(got["y"], swiglu(x, w_g, w_u, w_d), rtol=1e-5, atol=1e-5)
    assert got["adjugate_rows"] == TOKENS * SPEC.groups


@pytest.mark.parametrize("spec,topk", [(SPEC, 1), (SPEC, 3), (PAPER, 3)],
                         ids=["linear-1", "linear-3", "paper-3"])
def test_sparse_selection_is_the_grove_formula(spec, topk):
    w_g, w_u, w_d, x = dense_case()
    got = run_layer(spec, topk=topk)
    torch.testing.assert_close(got["y"], grove_reference(spec, topk), rtol=1e-5, atol=1e-5)
    assert (got["y"] - swiglu(x, w_g, w_u, w_d)).abs().max() > 1e-3
    assert TOKENS <= got["adjugate_rows"] <= TOKENS * topk
