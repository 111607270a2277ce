"""CMoE carving on plain tensors: against slow references and the dense-equality invariant."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from carving_reference import carved_ffn_forward, cmoe_router_probs, swiglu
from megatron_grove.carving.clustering import balanced_assignment, balanced_clusters
from megatron_grove.carving.cmoe import carve_ffn
from megatron_grove.carving.neurons import activation_markers, ffn_hidden
from megatron_grove.carving.router_fit import representative_neurons
from megatron_grove.carving.router_fit import expert_activation_scores, linear_router


def _dense(d_h: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(d_h, hidden, generator=g) / hidden ** 0.5,
            torch.randn(d_h, hidden, generator=g) / hidden ** 0.5,
            torch.randn(hidden, d_h, generator=g) / d_h ** 0.5,
            torch.randn(64, hidden, generator=g))


def test_markers_are_each_tokens_top_k_by_magnitude():
    h = torch.tensor([[0.1, -3.0, 2.0, 0.0], [5.0, 0.2, -0.3, 0.1]])
    assert activation_markers(h, 2).tolist() == [[False, True, True, False],
                                                 [True, False, True, False]]
    with pytest.raises(ValueError, match="K_a=5"):
        activation_markers(h, 5)


def test_balanced_assignment_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        cost = torch.rand(6, 3, generator=g)
        best = min(sum(float(cost[j, c]) for j, c in enumerate(labels))
                   for labels in itertools.product(range(3), repeat=6)
                   if all(labels.count(c) == 2 for c in range(3)))
        got = balanced_assignment(cost, 2)
        assert torch.bincount(got, minlength=3).tolist() == [2, 2, 2]
        assert float(cost[torch.arange(6), got].sum()) == pytest.approx(best, abs=1e-6)


def test_balanced_assignment_matches_scipy_on_the_replicated_cost():
    g = torch.Generator().manual_seed(5)
    for case in range(60):
        clusters, size = 2 + case % 7, 1 + case % 5
        cost = torch.rand(clusters * size, clusters, generator=g)
        if case % 3 == 0:
            cost = (4 * cost).round()  # many ties
        rows, cols = linear_sum_assignment(cost.repeat_interleave(size, 1).double().numpy())
        best = float(cost.double().numpy()[rows, cols // size].sum())
        for init in (None, torch.arange(clusters).repeat(size)):  # greedy or a warm start
            got = balanced_assignment(cost, size, init=init)
            assert torch.bincount(got, minlength=clusters).tolist() == [size] * clusters
            assert float(cost.double()[torch.arange(clusters * size), got].sum()) == (
                pytest.approx(best, abs=1e-9))
    with pytest.raises(ValueError, match="not balanced"):
        balanced_assignment(torch.rand(4, 2), 2, init=torch.tensor([0, 0, 0, 1]))


def test_balanced_clusters_recover_planted_co_activation_groups():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(12) % 4  # neuron j belongs to planted group j % 4
    topic = torch.randint(0, 4, (300,), generator=g)  # each token activates one group...
    markers = groups[None, :] == topic[:, None]
    markers ^= torch.rand(300, 12, generator=g) < 0.05  # ...with a little noise
    got = balanced_clusters(markers, 4)
    for c in range(4):
        assert len(set(groups[got == c].tolist())) == 1  # every cluster is one planted group
    assert torch.bincount(got, minlength=4).tolist() == [3, 3, 3, 3]


def test_representative_is_the_member_closest_to_the_cluster_mean():
    g = torch.Generator().manual_seed(1)
    markers = torch.rand(40, 8, generator=g) < 0.4
    assignment = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    reps = representative_neurons(markers, assignment, 2)
    for c in range(2):
        members = [j for j in range(8) if assignment[j] == c]
        mean = markers[:, members].float().mean(dim=1)
        dist = {j: float((markers[:, j].float() - mean).abs().sum()) for j in members}
        assert int(reps[c]) == min(members, key=lambda j: (dist[j], j))


@pytest.mark.parametrize("router", ["linear", "paper"])
@pytest.mark.parametrize("d_h,shared,experts", [(64, 1, 4), (50, 3, 8), (37, 2, 8)])
def test_every_expert_active_equals_the_dense_ffn(d_h, shared, experts, router):
    w_g, w_u, w_d, x = _dense(d_h, 16)
    carved = carve_ffn(w_g, w_u, w_d, x, shared, experts, activation_topk=max(1, d_h // 4),
                       router=router)
    assert carved.router == router
    m = -(-d_h // experts)
    assert carved.expert_gate.shape == (experts - shared, m, 16)
    assert carved.shared_gate.shape == (shared * m, 16)
    # every dense neuron is in exactly one expert; the rest of the slots are zero padding
    assert sorted(carved.neuron_order.tolist()) == list(range(experts * m))
    dense = swiglu(x, w_g, w_u, w_d)
    routed = experts - shared
    torch.testing.assert_close(carved_ffn_forward(carved, x, topk=routed), dense,
                               rtol=1e-5, atol=1e-5)
    sparse = carved_ffn_forward(carved, x, topk=max(1, routed // 2))
    assert (sparse - dense).abs().max() > 1e-3  # dropping experts changes the output


def test_shared_experts_hold_the_most_active_neurons_and_router_rows_are_unit():
    w_g, w_u, w_d, x = _dense(48, 16, seed=2)
    carved = carve_ffn(w_g, w_u, w_d, x, 2, 6, activation_topk=12, router="paper")
    rates = activation_markers(ffn_hidden(x, w_g, w_u), 12).float().mean(0)
    expected = sorted(sorted(range(48), key=lambda j: (-float(rates[j]), j))[:16])
    assert carved.neuron_order[:16].tolist() == expected
    torch.testing.assert_close(carved.shared_down, w_d[:, expected])
    torch.testing.assert_close(carved.router_weight.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(carved.router_up.norm(dim=1), torch.ones(4))
    rows = {tuple(r.tolist()) for r in carved.router_weight}
    assert all(any(torch.allclose(w_g[j] / w_g[j].norm(), carved.router_weight[e])
                   for j in carved.neuron_order[16 + 8 * e:16 + 8 * (e + 1)].tolist())
               for e in range(4)) and len(rows) == 4  # each from a neuron of its own expert


@pytest.mark.parametrize("router", ["linear", "paper"])
def test_scale_and_bias_follow_the_definition(router):
    w_g, w_u, w_d, x = _dense(32, 8, seed=4)
    carved = carve_ffn(w_g, w_u, w_d, x, 1, 4, activation_topk=8, router=router)
    u = torch.tensor([0.5, -1.0, 2.0])
    big_bias = torch.tensor([0.0, 0.0, 10.0])  # forces expert 2 into every selection
    out = carved_ffn_forward(carved, x[:8], topk=1, scale=u, bias=big_bias)
    if router == "paper":
        logits = (torch.nn.functional.silu(x[:8] @ carved.router_weight.T)
                  * (x[:8] @ carved.router_up.T)).abs()
    else:
        logits = x[:8] @ carved.router_weight.T + carved.router_bias
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(cmoe_router_probs(x[:8], carved), probs)
    shared = swiglu(x[:8], carved.shared_gate, carved.shared_up, carved.shared_down)
    expert2 = swiglu(x[:8], carved.expert_gate[2], carved.expert_up[2], carved.expert_down[2])
    torch.testing.assert_close(out, shared + (1 + probs[:, 2:3] * 2.0) * expert2)


def test_linear_router_is_the_least_squares_fit_of_centred_targets():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(200, 6, generator=g) + 0.5
    a, c = torch.randn(3, 6, generator=g), torch.randn(3, generator=g)
    weight, bias = linear_router(x, x @ a.T + c, alpha=1e-12)
    # each token's targets are centred over the experts: the fit is a, c minus their means
    torch.testing.assert_close(weight, a - a.mean(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias, c - c.mean(), rtol=1e-4, atol=1e-4)
    # with noise: the normal equations of the penalised problem hold
    y = x @ a.T + c + 0.3 * torch.randn(200, 3, generator=g)
    weight, bias = linear_router(x, y, alpha=0.1)
    xc = (x - x.mean(0)).double()
    yc = (y - y.mean(1, keepdim=True)).double()
    yc = yc - yc.mean(0)
    gram = xc.T @ xc
    lhs = (gram + 0.1 * gram.diagonal().mean() * torch.eye(6, dtype=gram.dtype)) @ weight.T.double()
    torch.testing.assert_close(lhs, xc.T @ yc, rtol=1e-4, atol=1e-3)


def test_expert_activation_scores_sum_each_experts_magnitudes():
    h = torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.0, -0.5, 1.0]])
    members = torch.tensor([[3, 0], [1, 2]])
    assert expert_activation_scores(h, members).tolist() == [[5.0, 5.0], [1.5, 0.5]]


@pytest.mark.parametrize("router", ["linear", "paper"])
def test_carving_is_deterministic(router):
    w_g, w_u, w_d, x = _dense(37, 16, seed=7)
    hidden = ffn_hidden(x, w_g, w_u)
    runs = [carve_ffn(w_g, w_u, w_d, x, 2, 8, activation_topk=9, router=router),
            carve_ffn(w_g.clone(), w_u.clone(), w_d.clone(), x.clone(), 2, 8,
                      activation_topk=9, router=router),
            carve_ffn(w_g, w_u, w_d, x, 2, 8, activation_topk=9, router=router, hidden=hidden)]
    for other in runs[1:]:
        for field in dataclasses.fields(runs[0]):
            a, b = getattr(runs[0], field.name), getattr(other, field.name)
            assert (a is None and b is None) or torch.equal(a, b), field.name
    with pytest.raises(ValueError, match="--router oracle: allowed linear, paper"):
        carve_ffn(w_g, w_u, w_d, x, 2, 8, activation_topk=9, router="oracle")


@pytest.mark.parametrize("router", ["linear", "paper", "oracle"])
def test_exported_carved_ffn_routes_like_the_reference(router):
    from megatron_grove.benchmarking.cmoe import ExportedCarvedFFN

    w_g, w_u, w_d, x = _dense(37, 16, seed=8)
    carved = carve_ffn(w_g, w_u, w_d, x, 2, 8, activation_topk=9,
                       router="paper" if router == "paper" else "linear")
    shared = (carved.shared_gate, carved.shared_up, carved.shared_down)
    experts = (carved.expert_gate, carved.expert_up, carved.expert_down)
    rows = ({"gate_rows": carved.router_weight, "up_rows": carved.router_up}
            if router == "paper" else
            {"weight": carved.router_weight, "score_bias": carved.router_bias})
    torch.testing.assert_close(ExportedCarvedFFN(shared, experts, 6, router, rows)(x[None])[0],
                               swiglu(x, w_g, w_u, w_d), rtol=1e-5, atol=1e-5)
    got = ExportedCarvedFFN(shared, experts, 2, router, rows)(x)
    if router != "oracle":  # the router's own selection: the reference forward
        torch.testing.assert_close(got, carved_ffn_forward(carved, x, topk=2),
                                   rtol=1e-5, atol=1e-5)
        return
    for t in range(x.shape[0]):  # the experts of largest activation mass
        outputs = [swiglu(x[t:t + 1], carved.expert_gate[e], carved.expert_up[e],
                          carved.expert_down[e])[0] for e in range(6)]
        mass = [float(ffn_hidden(x[t:t + 1], carved.expert_gate[e], carved.expert_up[e]).abs()
                      .sum()) for e in range(6)]
        best = sorted(range(6), key=lambda e: -mass[e])[:2]
        want = swiglu(x[t:t + 1], *shared)[0] + outputs[best[0]] + outputs[best[1]]
        torch.testing.assert_close(got[t], want, rtol=1e-5, atol=1e-5)


def test_calibration_captures_every_ffns_input_and_activations(tmp_path):
    """The dense model built in memory from (config, state) is the saved one; one batched
    forward captures each layer's FFN input and h = silu(x W_g^T) * (x W_u^T)."""
    from tiny_models import tiny_llama
    from megatron_grove.carving.dense_model import calibration_activations, dense_model
    from megatron_grove.hf_conversion.safetensors_io import HFTensors, read_hf_config

    saved = tiny_llama(tmp_path, intermediate_size=44)
    with HFTensors(tmp_path) as tensors:
        state = {name: tensors[name].float() for name in tensors}
    model = dense_model(read_hf_config(tmp_path), state)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, saved(input_ids=ids).logits,
                                   rtol=0, atol=0)
    seen = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
             for layer in saved.model.layers]
    with torch.no_grad():
        saved(input_ids=ids)
    for hook in hooks:
        hook.remove()
    inputs, hidden = calibration_activations(model, ids)
    assert len(inputs) == len(hidden) == 2
    for i, layer in enumerate(saved.model.layers):
        x = seen[i].reshape(-1, 64)
        torch.testing.assert_close(inputs[i], x)
        torch.testing.assert_close(hidden[i], ffn_hidden(x, layer.mlp.gate_proj.weight,
                                                         layer.mlp.up_proj.weight))


@pytest.mark.parametrize("tokens,window", [(2048, 512), (300, 64)])
def test_calibration_windows_are_the_whole_texts_first_tokens(tokens, window):
    """Tokenising a prefix of the corpus gives the first tokens of tokenising all of it."""
    from transformers import PreTrainedTokenizerFast

    from megatron_grove.carving.dense_model import (
        calibration_token_windows,
        default_calibration_text,
    )
    from megatron_grove.data.tokenizer import default_tokenizer_path

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=default_tokenizer_path())
    text = default_calibration_text()
    whole = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = calibration_token_windows(tokenizer, text, tokens, window)
    rows = tokens // window
    assert windows.shape == (rows, window)
    assert windows.flatten().tolist() == whole[:rows * window]
    short = text[:2000]  # fewer tokens than asked: all of them, in whole windows
    short_ids = tokenizer(short, add_special_tokens=False)["input_ids"]
    got = calibration_token_windows(tokenizer, short, 10 ** 6, window)
    assert got.flatten().tolist() == short_ids[:len(short_ids) // window * window]
