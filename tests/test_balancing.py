"""Aux-loss-free balancing (megatron_grove.moe.balancing): the paper's and Megatron's bias rules,
the reduction over data-parallel ranks, and a skewed router evened out over a few hundred
steps (CPU, gloo)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest
import torch

from config_builders import HIDDEN, router_config
from config_builders import ROUTER_EXPERTS as EXPERTS
from megatron_grove.moe.balancing import paper_bias_update, update_expert_bias
from megatron_grove.moe.router import GroveTopKRouter
from processes import in_worker, run_distributed

RATE = 0.01


def test_paper_rule():
    counts = torch.tensor([[10.0, 0, 5, 5, 2, 8, 5, 5], [3.0] * 8])  # second row: balanced
    bias = torch.linspace(-1, 1, 8).expand(2, 8)
    updated = paper_bias_update(counts, bias, RATE)
    deviation = counts[0].double() - 5
    expected = bias[0].double() - RATE * deviation / deviation.pow(2).mean().sqrt()
    torch.testing.assert_close(updated[0].double(), expected, rtol=0, atol=1e-7)
    assert torch.equal(updated[1], bias[1])  # RMS(F - Q) = 0: no change


def _update_once(rule: str, counts: torch.Tensor, bias: torch.Tensor) -> dict[str, Any]:
    def update():
        routers = [GroveTopKRouter(router_config()) for _ in range(2)]
        with torch.no_grad():
            for router in routers:
                router.local_tokens_per_expert.copy_(counts)
                router.expert_bias.copy_(bias)
        routers[1].eval()  # eval-mode routers are left alone
        returned = update_expert_bias(routers, rule, RATE)
        return {"returned": returned, "bias": [r.expert_bias.clone() for r in routers],
                "counts": [r.local_tokens_per_expert.clone() for r in routers]}
    return in_worker(update)


def test_megatron_rule_moves_bias_by_exactly_the_rate():
    counts = torch.tensor([9.0, 1, 4, 4, 6, 2, 4, 2])  # mean 4
    bias = torch.linspace(-0.5, 0.5, EXPERTS)
    result = _update_once("megatron", counts, bias)
    step = result["bias"][0] - bias
    assert torch.equal(step.sign(), (4 - counts).sign())  # experts at the mean stay put
    torch.testing.assert_close(step.abs()[counts != 4], torch.full((5,), RATE), rtol=0, atol=1e-7)
    assert torch.equal(result["bias"][1], bias)
    assert len(result["returned"]) == 1 and torch.equal(result["returned"][0], counts)
    assert torch.equal(result["counts"][0], torch.zeros(EXPERTS))
    assert torch.equal(result["counts"][1], counts)


def test_paper_rule_through_update_expert_bias():
    counts = torch.tensor([9.0, 1, 4, 4, 6, 2, 4, 2])
    bias = torch.zeros(EXPERTS)
    result = _update_once("paper", counts, bias)
    torch.testing.assert_close(result["bias"][0], paper_bias_update(counts, bias, RATE))
    assert torch.equal(result["counts"][0], torch.zeros(EXPERTS))


def test_rejects_unknown_rule_and_missing_bias():
    def errors():
        router = GroveTopKRouter(router_config(rule="none"))
        found = []
        for rule in ("sign", "paper"):
            with pytest.raises(ValueError) as err:
                update_expert_bias([router], rule, RATE)
            found.append(str(err.value))
        counts = update_expert_bias([router], "none", RATE)  # counts only
        return found, counts

    (unknown, missing), counts = in_worker(errors)
    assert "allowed paper, megatron, none" in unknown
    assert "moe_bias_update_rule='none'" in missing
    assert len(counts) == 1 and counts[0].shape == (EXPERTS,)


def _two_ranks(rank: int) -> bytes:
    router = GroveTopKRouter(router_config())
    with torch.no_grad():
        router.local_tokens_per_expert.copy_(torch.arange(EXPERTS) * (rank + 1.0))
    returned = update_expert_bias([router], "paper", RATE)
    return pickle.dumps((returned[0], router.expert_bias.clone()))


def test_counts_are_summed_over_data_parallel_ranks():
    (counts0, bias0), (counts1, bias1) = [pickle.loads(r)
                                          for r in run_distributed(_two_ranks, world_size=2)]
    expected = torch.arange(EXPERTS) * 3.0
    assert torch.equal(counts0, expected) and torch.equal(counts1, expected)
    assert torch.equal(bias0, bias1)
    torch.testing.assert_close(bias0, paper_bias_update(expected, torch.zeros(EXPERTS), RATE))


def _imbalance(counts: torch.Tensor) -> float:
    return (counts.max() / counts.mean()).item()


def test_paper_rule_evens_out_a_skewed_router():
    """Experts 0 and 1 get most tokens from a router pulled toward the tokens' common direction;
    300 steps of the paper rule bring max/mean tokens per expert down by a clear factor."""
    def train(steps: int = 300, tokens: int = 128) -> tuple[float, float]:
        gen = torch.Generator().manual_seed(0)
        direction = torch.nn.functional.normalize(torch.randn(HIDDEN, generator=gen), dim=0)
        router = GroveTopKRouter(router_config("sigmoid"))
        with torch.no_grad():
            router.weight.copy_(0.3 * torch.randn(EXPERTS, HIDDEN, generator=gen))
            router.weight[:2] += 1.5 * direction
        loads = []
        for _ in range(steps):
            x = torch.randn(tokens, 1, HIDDEN, generator=gen) * 0.5 + direction
            router(x)
            loads.append(update_expert_bias([router], "paper", RATE)[0])
        return _imbalance(loads[0]), _imbalance(sum(loads[-50:]))

    before, after = in_worker(train)
    assert before > 2.5, before
    assert after < 1.3 and before / after > 2.5, (before, after)
