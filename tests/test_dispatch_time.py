"""The all-to-all projection (planner/dispatch_time.py): copies per link against a Monte-Carlo
count of uniform top-k routing over ranks and nodes, times against the formula by hand."""

import dataclasses

import pytest
import torch

from megatron_grove.planner.dispatch_time import Links, project_dispatch

E, K, G, H = 128, 8, 64, 2048


def _rows(ep: int, links: Links = Links(), **kwargs) -> dict[tuple[str, str], object]:
    args = dict(num_experts=E, topk=K, num_groups=G, ep=ep, hidden_size=H, bytes_per_element=2,
                tokens_per_microbatch=8192, microbatches=8, moe_layers=48, passes=3)
    args.update(kwargs)
    return {(r.strategy, r.route): r for r in project_dispatch(**args, links=links)}


def _monte_carlo(ep: int, per_node: int, tokens: int = 50_000, seed: int = 0) -> dict:
    """Tokens of EP rank 0 (node 0) routed uniformly: per token, the distinct ranks hit on node 0
    other than rank 0 (NVLink), on other nodes (RDMA), the distinct other nodes hit, and the
    (token, expert) and (token, group) copies on those links."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.rand(tokens, E, generator=g).topk(K, dim=1).indices
    rank = experts // (E // ep)
    node = rank // per_node
    ranks_hit = torch.zeros(tokens, ep, dtype=torch.bool).scatter_(1, rank, True)
    nodes_hit = torch.zeros(tokens, ep // per_node, dtype=torch.bool).scatter_(1, node, True)
    groups_hit = torch.zeros(tokens, G, dtype=torch.bool).scatter_(1, experts // (E // G), True)
    group_rank = torch.arange(G) // (G // ep)
    remote_group = groups_hit & (group_rank >= per_node)
    return {
        "rank_nvlink": ranks_hit[:, 1:per_node].sum(1).double().mean().item(),
        "rank_rdma": ranks_hit[:, per_node:].sum(1).double().mean().item(),
        "node_rdma": nodes_hit[:, 1:].sum(1).double().mean().item(),
        "expert_rdma": (node > 0).sum(1).double().mean().item(),
        "virtual_rdma": ((node > 0).sum(1) + remote_group.sum(1)).double().mean().item(),
    }


@pytest.mark.parametrize("ep", (16, 64))
def test_copies_per_link_match_monte_carlo(ep):
    rows, mc = _rows(ep), _monte_carlo(ep, per_node=8)
    grove, plain = rows["grove_alltoall", "flat"], rows["alltoall, plain MoE", "flat"]
    virtual = rows["alltoall, virtual adjugates", "flat"]
    # 50k tokens: standard errors below 0.01 copies
    assert grove.nvlink_copies_per_token == pytest.approx(mc["rank_nvlink"], abs=0.03)
    assert grove.rdma_copies_per_token == pytest.approx(mc["rank_rdma"], abs=0.03)
    assert plain.rdma_copies_per_token == pytest.approx(mc["expert_rdma"], abs=0.03)
    assert virtual.rdma_copies_per_token == pytest.approx(mc["virtual_rdma"], abs=0.05)
    hierarchical = rows["grove_hierarchical", "hierarchical"]
    assert hierarchical.rdma_copies_per_token == pytest.approx(mc["node_rdma"], abs=0.03)
    # forwarded inside the node: once per destination rank other than the landing one
    assert hierarchical.nvlink_copies_per_token == pytest.approx(
        grove.copies_per_token * 7 / 8, abs=1e-9)
    # fewer RDMA rows, the rest forwarded over NVLink: never slower than flat here
    assert hierarchical.rdma_copies_per_token < grove.rdma_copies_per_token
    assert hierarchical.layer_ms <= grove.layer_ms


def test_one_node_by_hand():
    """EP 8 on one 8-GPU node: no RDMA, no hierarchical rows (grove_hierarchical is
    grove_alltoall); dispatch rows carry the E/ep = 16 routing weights (group-aware) or 1
    (alltoall), combine rows the hidden vector only."""
    rows = _rows(8)
    assert {route for _, route in rows} == {"flat"}
    assert rows["grove_hierarchical", "flat"] == dataclasses.replace(
        rows["grove_alltoall", "flat"], strategy="grove_hierarchical")
    grove = rows["grove_alltoall", "flat"]
    copies = grove.copies_per_token
    assert copies == pytest.approx(5.3394, abs=1e-4)
    assert grove.nvlink_copies_per_token == pytest.approx(copies * 7 / 8)
    assert grove.rdma_copies_per_token == grove.rdma_bytes_per_token == 0
    seconds = 8192 * copies * 7 / 8 * ((2 * H + 2 * 16) + 2 * H) / 153e9
    assert grove.layer_ms == pytest.approx(1e3 * seconds)
    assert grove.step_s == pytest.approx(seconds * 8 * 48 * 3)
    plain = rows["alltoall, plain MoE", "flat"]
    assert plain.layer_ms == pytest.approx(1e3 * 8192 * 8 * 7 / 8 * (4 * H + 2) / 153e9)


def test_the_slower_link_sets_the_time():
    """Flat at EP 16 over 2 nodes: NVLink and RDMA run together; the time is the larger share."""
    links = Links(gpus_per_node=8, nvlink_gbps=1e6, rdma_gbps=10.0)  # NVLink ~free
    grove = _rows(16, links)["grove_alltoall", "flat"]
    rdma_s = 8192 * grove.rdma_copies_per_token * ((2 * H + 2 * 8) + 2 * H) / 10e9
    assert grove.layer_ms == pytest.approx(1e3 * rdma_s, rel=1e-4)


def test_placement_problems_are_named():
    assert Links(gpus_per_node=6).problems(8) == [
        "EP 8 spans nodes of 6 GPUs: it must be a multiple of 6"]
    assert Links(gpus_per_node=6).problems(4) == []
    with pytest.raises(ValueError, match="must be a multiple"):
        _rows(8, Links(gpus_per_node=6))
