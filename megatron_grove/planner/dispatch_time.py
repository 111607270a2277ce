"""Projected all-to-all time of one MoE layer at cluster scale, from each strategy's analytic
copies per token and stated link bandwidths (docs/design.md, "Projection to
scale").

The EP group's ``ep`` ranks are consecutive (Megatron's order with TP = 1), ``r = min(ep, g)``
of them on each of ``ep / r`` nodes (``g`` GPUs per node). Under uniform routing a token's
copies spread evenly over the EP ranks, so of ``c`` copies a share ``1/ep`` stays on the rank,
``(r - 1)/ep`` crosses NVLink and ``(ep - r)/ep`` crosses the inter-node (RDMA) link.

Each strategy's rows per token on each link come from its own entry in the table of
strategies (:data:`megatron_grove.moe.dispatchers.GROVE_DISPATCHERS`, each class's
:meth:`~megatron_grove.moe.dispatchers.base.GroveDispatcher.expected_copies`):

* **flat** (Megatron's all-to-all, ``grove_alltoall``): every copy goes straight to its rank;
  NVLink and RDMA carry their shares at the same time, so a collective takes
  ``max(NVLink bytes / NVLink bandwidth, RDMA bytes / RDMA bandwidth)``;
* **hierarchical** (``grove_hierarchical``, DeepEP's scheme with adjugates): a token crosses
  RDMA once per destination node (``(nodes - 1) x P(node hit)`` times, ``P = hits(E, k,
  nodes) / nodes``), landing on the GPU with the sender's local index, which forwards it over
  NVLink to the node's destination ranks; the two phases overlap (pipelined), so again the max
  of the two.

Bytes per copy: the hidden vector and the strategy's routing values in the activation dtype (1
weight for ``alltoall``, ``E/ep`` for ``grove_alltoall``, the ``2 min(k, E/nodes)`` selected
weights and columns on a hierarchical RDMA hop) on dispatch; the hidden vector on combine. Latency, congestion, load imbalance and overlap
with compute are not modelled.
"""

from __future__ import annotations

import dataclasses

from megatron_grove.config import GroveConfig
from megatron_grove.megatron_config import TORCH_DTYPES
from megatron_grove.moe.dispatchers import GROVE_DISPATCHERS

__all__ = ["Links", "DispatchProjection", "STRATEGIES", "project_dispatch", "project_run",
           "format_projection"]

# the rows shown: (name, moe.token_dispatcher_type, with adjugates)
STRATEGIES = (("alltoall, plain MoE", "alltoall", False),
              ("alltoall, virtual adjugates", "alltoall", True),
              ("grove_alltoall", "grove_alltoall", True),
              ("grove_hierarchical", "grove_hierarchical", True))


@dataclasses.dataclass(frozen=True)
class Links:
    """The cluster's links, per GPU and direction. Defaults: DeepEP's published normal-kernel
    figures on H800 (docs/design.md 6.5): 153 GB/s intranode (NVLink, EP 8 dispatch; combine
    158) and 50 GB/s internode (RDMA, EP 64: 51 dispatch, 50 combine; the CX7 NIC's ~50 GB/s
    maximum)."""

    gpus_per_node: int = 8
    nvlink_gbps: float = 153.0
    rdma_gbps: float = 50.0

    def problems(self, ep: int) -> list[str]:
        """What makes ``ep`` ranks impossible to place on these nodes (empty when fine)."""
        out = []
        if self.gpus_per_node < 1 or self.nvlink_gbps <= 0 or self.rdma_gbps <= 0:
            out.append("GPUs per node and bandwidths must be positive")
        elif ep > self.gpus_per_node and ep % self.gpus_per_node:
            out.append(f"EP {ep} spans nodes of {self.gpus_per_node} GPUs: it must be a "
                       f"multiple of {self.gpus_per_node}")
        return out


@dataclasses.dataclass(frozen=True)
class DispatchProjection:
    """One strategy and route: bytes one rank sends per token and projected times."""

    strategy: str
    route: str  # "flat" | "hierarchical"
    copies_per_token: float  # the strategy's rows per token (its own rank included)
    nvlink_copies_per_token: float  # rows crossing NVLink (hierarchical: forwarding included)
    rdma_copies_per_token: float  # rows crossing the inter-node link
    nvlink_bytes_per_token: float  # dispatch direction
    rdma_bytes_per_token: float  # dispatch direction
    layer_ms: float  # one micro-batch through one MoE layer: forward dispatch + combine
    step_s: float  # every micro-batch, MoE layer and pass (forward, backward, recompute)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _seconds(nvlink_bytes: float, rdma_bytes: float, links: Links) -> float:
    return max(nvlink_bytes / (links.nvlink_gbps * 1e9), rdma_bytes / (links.rdma_gbps * 1e9))


def project_dispatch(num_experts: int, topk: int, num_groups: int, ep: int, hidden_size: int,
                     bytes_per_element: int, tokens_per_microbatch: int, microbatches: int,
                     moe_layers: int, passes: int, links: Links = Links()
                     ) -> list[DispatchProjection]:
    """Projections of the strategies (module docstring), each on its own route, for one
    rank's ``tokens_per_microbatch`` tokens per MoE layer; ``passes`` = the dispatch + combine
    pairs per layer and micro-batch (2: forward and backward; 3 with full recompute)."""
    problems = links.problems(ep)
    if problems:
        raise ValueError("; ".join(problems))
    nodes = ep // min(ep, links.gpus_per_node)
    h, b = hidden_size * bytes_per_element, bytes_per_element
    out = []
    for name, dispatcher, adjugates in STRATEGIES:
        cost = GROVE_DISPATCHERS[dispatcher].expected_copies(
            num_experts, topk, num_groups if adjugates else 0, ep, nodes)
        nvlink_row, rdma_row = h + cost.routing_values * b, h + cost.internode_routing_values * b
        dispatch_s = _seconds(cost.intranode * nvlink_row, cost.internode * rdma_row, links)
        combine_s = _seconds(cost.intranode * h, cost.internode * h, links)
        layer_s = tokens_per_microbatch * (dispatch_s + combine_s)
        out.append(DispatchProjection(
            strategy=name, route=cost.route, copies_per_token=cost.copies,
            nvlink_copies_per_token=cost.intranode, rdma_copies_per_token=cost.internode,
            nvlink_bytes_per_token=cost.intranode * nvlink_row,
            rdma_bytes_per_token=cost.internode * rdma_row,
            layer_ms=1e3 * layer_s, step_s=layer_s * microbatches * moe_layers * passes))
    return out


def project_run(cfg: GroveConfig, moe_layers: int, world_size: int,
                links: Links = Links()) -> dict:
    """:func:`project_dispatch` for the configured model and layout on ``world_size`` ranks:
    one micro-batch of ``seq x micro-batch (/ TP under sequence parallelism)`` tokens per rank,
    ``global batch / (DP x micro-batch)`` micro-batches, 2 passes (3 with full recompute)."""
    m, e, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    tp, ep = p.tensor_model_parallel_size, p.expert_model_parallel_size
    dp = world_size // (tp * p.pipeline_model_parallel_size)
    tokens = m.seq_length * t.micro_batch_size // (tp if p.sequence_parallel else 1)
    microbatches = t.global_batch_size // (dp * t.micro_batch_size)
    passes = 3 if p.recompute_granularity == "full" else 2
    rows = project_dispatch(e.num_experts, e.router_topk, e.num_expert_groups, ep,
                            m.hidden_size, TORCH_DTYPES[cfg.runtime.dtype].itemsize, tokens,
                            microbatches, moe_layers, passes, links)
    return {"links": dataclasses.asdict(links), "expert_parallel_size": ep,
            "nodes_per_ep_group": max(1, ep // links.gpus_per_node),
            "tokens_per_microbatch": tokens, "microbatches": microbatches, "passes": passes,
            "moe_layers": moe_layers, "rows": [r.as_dict() for r in rows]}


def format_projection(projection: dict) -> str:
    """The projection as a table, its assumptions in the heading."""
    links = projection["links"]
    lines = [f"projected all-to-all per MoE layer (EP {projection['expert_parallel_size']} over "
             f"{projection['nodes_per_ep_group']} node(s) of {links['gpus_per_node']} GPUs; "
             f"NVLink {links['nvlink_gbps']:g} GB/s, RDMA {links['rdma_gbps']:g} GB/s; "
             f"uniform routing; {projection['tokens_per_microbatch']} tokens per rank and "
             f"micro-batch)",
             f"  {'strategy':<28} {'route':<12} {'copies':>6} {'NVLink':>7} {'RDMA':>6} "
             f"{'fwd ms':>7} {'step s':>7}"]
    for r in projection["rows"]:
        lines.append(f"  {r['strategy']:<28} {r['route']:<12} {r['copies_per_token']:>6.2f} "
                     f"{r['nvlink_copies_per_token']:>7.2f} {r['rdma_copies_per_token']:>6.2f} "
                     f"{r['layer_ms']:>7.2f} {r['step_s']:>7.2f}")
    lines.append(f"  (copies per token: all / over NVLink / over RDMA; fwd ms: dispatch + combine "
                 f"of one micro-batch; step s: x {projection['microbatches']} micro-batches x "
                 f"{projection['moe_layers']} MoE layers x {projection['passes']} passes)")
    return "\n".join(lines)
