"""GroveTopKRouter (CPU, fp32): Megatron's TopKRouter when there is no bias, the biased
sigmoid selection with unbiased weights, unnormalised weights (norm_topk_prob false), a bias
kept outside selection, token counting, the aux-loss path, checkpoints."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from config_builders import HIDDEN, router_config
from config_builders import ROUTER_EXPERTS as EXPERTS
from grove_reference import route
from megatron_grove.moe.router import GroveTopKRouter
from processes import in_worker

TOKENS = 24
SCORE_FUNCTIONS = ("softmax", "sigmoid")


def tokens(seed: int = 0) -> torch.Tensor:
    """``[T, 1, H]`` tokens."""
    return torch.randn(TOKENS, 1, HIDDEN, generator=torch.Generator().manual_seed(seed))


def route_and_backward(router: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_()
    probs, routing_map = router(x)
    cotangent = torch.randn(probs.shape, generator=torch.Generator().manual_seed(1))
    (probs * cotangent).sum().backward()
    return {"probs": probs.detach(), "map": routing_map, "x_grad": x.grad,
            "weight_grad": router.weight.grad}


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
@pytest.mark.parametrize("rule", ("none", "paper"))
def test_without_bias_equals_megatron_router(score_function, rule):
    """No bias (rule 'none'), or a zero bias: the same probs, routing map and gradients as
    Megatron's TopKRouter (pre-softmax off / sigmoid with top-k normalisation)."""
    def compare():
        config = router_config(score_function, rule)
        ours = GroveTopKRouter(config)
        stock = TopKRouter(config, get_default_pg_collection())
        with torch.no_grad():
            stock.weight.copy_(ours.weight)
        return route_and_backward(ours, tokens()), route_and_backward(stock, tokens())

    ours, stock = in_worker(compare)
    assert torch.equal(ours["map"], stock["map"])
    for key in ("probs", "x_grad", "weight_grad"):
        torch.testing.assert_close(ours[key], stock[key], rtol=0, atol=1e-7)


@pytest.mark.parametrize("score_function", SCORE_FUNCTIONS)
def test_bias_selects_but_does_not_weight(score_function):
    """Selection = top-k of sigmoid(logits) + bias; weights = the unbiased scores of the
    selection (softmax over the selected logits / renormalised sigmoids)."""
    def biased():
        router = GroveTopKRouter(router_config(score_function))
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(-0.3, 0.3, EXPERTS))
        probs, routing_map = router(tokens())
        unbiased = GroveTopKRouter(router_config(score_function, rule="none"))
        unbiased.load_state_dict(router.state_dict(), strict=False)
        return (router.weight.detach(), router.expert_bias.clone(), probs.detach(), routing_map,
                unbiased(tokens())[1], router.expert_bias.requires_grad)

    weight, bias, probs, routing_map, unbiased_map, bias_requires_grad = in_worker(biased)
    assert not bias_requires_grad
    assert not torch.equal(routing_map, unbiased_map), "the bias should change some selections"
    for t, token in enumerate(tokens()[:, 0]):
        expected = torch.zeros(EXPERTS)
        for expert, weight_i in route(weight @ token, 2, score_function, expert_bias=bias):
            expected[expert] = weight_i
        assert torch.equal(routing_map[t], expected > 0)
        torch.testing.assert_close(probs[t], expected, rtol=0, atol=1e-6)


# (score function, k, norm_topk_prob, bias in selection); softmax with k = 1 is refused by the
# config (as by Megatron, which needs pre-softmax for it)
ROUTING_CASES = [(f, k, n, b) for f in SCORE_FUNCTIONS for k in (1, 3) for n in (True, False)
                 for b in (True, False) if not (f == "softmax" and k == 1)]


@pytest.mark.parametrize("score_function,topk,norm_topk_prob,bias_in_selection", ROUTING_CASES,
                         ids=[f"{f}-k{k}-norm{int(n)}-selects{int(b)}"
                              for f, k, n, b in ROUTING_CASES])
def test_routing_options_match_reference(score_function, topk, norm_topk_prob,
                                         bias_in_selection):
    """Every combination of score function, norm_topk_prob and bias-in-selection, with a
    non-zero bias: probs, routing map and the router weight's gradient equal the plain-torch
    reference's (``grove_reference.route``)."""
    bias = torch.linspace(-0.3, 0.3, EXPERTS)
    cotangent = torch.randn(TOKENS, EXPERTS, generator=torch.Generator().manual_seed(1))

    def ours():
        router = GroveTopKRouter(router_config(score_function, topk=topk,
                                               norm_topk_prob=norm_topk_prob,
                                               bias_in_selection=bias_in_selection))
        with torch.no_grad():
            router.expert_bias.copy_(bias)
        out = route_and_backward(router, tokens())
        return router.weight.detach().clone(), out

    weight, out = in_worker(ours)
    weight = weight.clone().requires_grad_()
    rows = []
    for t, token in enumerate(tokens()[:, 0]):
        row = torch.zeros(EXPERTS)
        for expert, weight_i in route(weight @ token, topk, score_function, bias,
                                      norm_topk_prob, bias_in_selection):
            row = row + torch.nn.functional.one_hot(torch.tensor(expert), EXPERTS) * weight_i
        rows.append(row)
    expected = torch.stack(rows)
    (expected * cotangent).sum().backward()
    assert torch.equal(out["map"], expected.detach() > 0)
    torch.testing.assert_close(out["probs"], expected.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["weight_grad"], weight.grad, rtol=0, atol=1e-5)
    if not bias_in_selection:  # the bias is kept but selects nothing: as if there were none
        unbiased = torch.stack([torch.topk(weight.detach() @ token, topk).indices.sort().values
                                for token in tokens()[:, 0]])
        assert torch.equal(out["map"].nonzero()[:, 1].reshape(TOKENS, topk), unbiased)


def test_bias_outside_selection_is_kept_and_not_updated():
    """A bias that does not select stays as it is under balancing (counts are still reset)."""
    from megatron_grove.moe.balancing import update_expert_bias

    def step(selects):
        router = GroveTopKRouter(router_config(bias_in_selection=selects))
        with torch.no_grad():
            router.expert_bias.copy_(torch.linspace(-0.3, 0.3, EXPERTS))
        router(tokens())
        update_expert_bias([router], "paper", 0.1)
        return router.expert_bias.clone(), router.local_tokens_per_expert.clone()

    kept, counts = in_worker(lambda: step(False))
    moved, _ = in_worker(lambda: step(True))
    assert torch.equal(kept, torch.linspace(-0.3, 0.3, EXPERTS)) and not counts.any()
    assert not torch.equal(moved, kept)


def test_counts_routed_tokens_while_grad_is_enabled():
    def count():
        router = GroveTopKRouter(router_config("sigmoid", rule="none"))
        maps = [router(tokens(seed))[1] for seed in (0, 1)]
        with torch.no_grad():
            router(tokens(2))
        return router.local_tokens_per_expert.clone(), maps

    counts, maps = in_worker(count)
    assert torch.equal(counts, (maps[0].sum(0) + maps[1].sum(0)).float())
    assert counts.sum() == 2 * TOKENS * 2


def test_megatron_aux_loss_path():
    """aux_loss_coeff > 0: Megatron's load-balancing loss reaches the router weight, as in
    Megatron's TopKRouter."""
    def grads():
        ours = GroveTopKRouter(router_config(aux_loss_coeff=0.1))
        stock = TopKRouter(router_config(aux_loss_coeff=0.1), get_default_pg_collection())
        plain = GroveTopKRouter(router_config())
        for router in (ours, stock, plain):
            router.set_layer_number(1)
            with torch.no_grad():
                router.weight.copy_(ours.weight)
        return [route_and_backward(r, tokens())["weight_grad"] for r in (ours, stock, plain)]

    ours, stock, plain = in_worker(grads)
    torch.testing.assert_close(ours, stock, rtol=0, atol=1e-7)
    assert (ours - plain).abs().max() > 1e-4


def test_bias_is_checkpointed():
    def state():
        router = GroveTopKRouter(router_config())
        with torch.no_grad():
            router.expert_bias.copy_(torch.arange(EXPERTS, dtype=torch.float32))
        restored = GroveTopKRouter(router_config())
        restored.load_state_dict(router.state_dict())
        no_bias = GroveTopKRouter(router_config(rule="none"))
        return (sorted(router.state_dict()), sorted(router.sharded_state_dict("mlp.router.")),
                restored.expert_bias.clone(), sorted(no_bias.state_dict()))

    keys, sharded_keys, restored_bias, no_bias_keys = in_worker(state)
    assert keys == ["expert_bias", "weight"]  # local_tokens_per_expert is not persistent
    assert "mlp.router.expert_bias" in sharded_keys
    assert torch.equal(restored_bias, torch.arange(EXPERTS, dtype=torch.float32))
    assert no_bias_keys == ["weight"]


def test_rejects_conflicting_megatron_options():
    def messages():
        found = []
        for config in (router_config("sigmoid", moe_router_enable_expert_bias=True),
                       router_config("softmax", moe_enable_routing_replay=True)):
            with pytest.raises(ValueError) as err:
                GroveTopKRouter(config)
            found.append(str(err.value))
        return found

    enable_bias, replay = in_worker(messages)
    assert "moe_router_enable_expert_bias" in enable_bias
    assert "moe_enable_routing_replay" in replay
