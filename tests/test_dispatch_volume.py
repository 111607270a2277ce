"""The analytic dispatch model against a Monte-Carlo count of uniform top-k routing."""

import pytest
import torch

from megatron_grove.planner.dispatch_volume import (
    copies_per_token,
    dispatch_volume,
    expected_blocks_hit,
)


def _monte_carlo_blocks(num_experts, topk, num_blocks, tokens=100_000, seed=0):
    """Route ``tokens`` tokens uniformly (k distinct experts each) and count distinct blocks."""
    g = torch.Generator().manual_seed(seed)
    choice = torch.rand(tokens, num_experts, generator=g).topk(topk, dim=1).indices
    hit = torch.zeros(tokens, num_blocks, dtype=torch.bool)
    hit.scatter_(1, choice // (num_experts // num_blocks), True)
    return hit.sum(1).double().mean().item()


@pytest.mark.parametrize("blocks", [2, 4, 8, 16, 64])
def test_expected_blocks_hit_matches_monte_carlo(blocks):
    exact = expected_blocks_hit(128, 8, blocks)
    # 100k tokens: the standard error of the mean is < 0.005 blocks
    assert exact == pytest.approx(_monte_carlo_blocks(128, 8, blocks), abs=0.02)


def test_design_figures():
    """docs/design.md, "Performance model": E=128, top-8."""
    once_per_rank = [copies_per_token("grove_alltoall", 128, 8, ep, 64) for ep in (2, 4, 8, 16)]
    assert [round(c, 2) for c in once_per_rank] == [1.99, 3.63, 5.34, 6.60]
    assert round(expected_blocks_hit(128, 8, 64), 2) == 7.78
    assert round(expected_blocks_hit(128, 8, 16), 2) == 6.60
    assert copies_per_token("alltoall", 128, 8, 8, 0) == 8
    assert copies_per_token("alltoall", 128, 8, 8, 64) == pytest.approx(8 + 7.78, abs=0.005)
    assert copies_per_token("allgather", 128, 8, 8, 64) == 8


def test_volume_counts_layers_collectives_and_the_wire_share():
    v = dispatch_volume("alltoall", 8, 2, ep=4, num_groups=0, moe_layers=3, tokens_per_rank=100,
                        hidden_size=16, bytes_per_element=2)
    assert v.bytes_per_step == 4 * 3 * 100 * 2 * 16 * 2
    assert v.off_rank_bytes_per_step == v.bytes_per_step * 3 / 4
    local = dispatch_volume("alltoall", 8, 2, ep=1, num_groups=0, moe_layers=3,
                            tokens_per_rank=100, hidden_size=16, bytes_per_element=2)
    assert local.off_rank_bytes_per_step == 0


def test_blocks_must_divide_experts():
    with pytest.raises(ValueError, match="must divide"):
        expected_blocks_hit(128, 8, 3)
