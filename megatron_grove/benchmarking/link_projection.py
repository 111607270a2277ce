"""The planner's projection (:mod:`megatron_grove.planner.dispatch_time`) for the link of an
emulated cluster (:mod:`.emulated_cluster`), beside what the kernel counters measured.

The emulated cluster's "nodes" hold ``ranks_per_node`` ranks each, joined by their loopback
(no bandwidth limit: the planner's NVLink is set infinite) and, between nodes, by one link of
``link_gbps`` Gbit/s per direction shared by the node's ranks (the planner's RDMA bandwidth per
GPU: ``link_gbps / 8 / ranks_per_node`` GB/s). Bytes that cross the links, all nodes together:

* one MoE layer, forward + backward: ``2 x ep x tokens x`` (RDMA bytes per token on dispatch
  ``+`` RDMA copies per token ``x H x b`` on combine); the backward sends the same volumes
  (the gradients of rows and weights, then of the partial sums);
* a training step: that for every MoE layer, micro-batch and pass, plus Megatron DDP's
  all-reduce of the dense gradients (fp32 buffer) over the ``ep`` data-parallel ranks, a ring
  in rank order under gloo, which crosses the ``nodes`` node boundaries with ``2 (ep - 1) / ep``
  of the buffer each (measured on the emulated cluster: 3.0 x the buffer at 2 x 2);
  the expert gradients are not reduced (expert-DP size 1).

Time: the planner's (bytes over the link, no latency, no overlap); the all-reduce crosses
each node's uplink once, so it adds ``2 (ep - 1) / ep x buffer / link``.
"""

from __future__ import annotations

import math

from megatron_grove.benchmarking.emulated_cluster import LinkSpec
from megatron_grove.config import GroveConfig
from megatron_grove.megatron_config import TORCH_DTYPES
from megatron_grove.planner.dispatch_time import Links, project_dispatch, project_run

__all__ = ["DISPATCH_VARIANT_STRATEGIES", "TRAIN_STEP_VARIANT_STRATEGIES", "emulated_links",
           "project_layer_on_links", "project_step_on_links", "allreduce_link_bytes"]

# benchmark variant -> (the planner's strategy, route)
DISPATCH_VARIANT_STRATEGIES = {
    "alltoall": ("alltoall, plain MoE", "flat"),
    "alltoall_virtual_adjugates": ("alltoall, virtual adjugates", "flat"),
    "group_aware": ("grove_alltoall", "flat"),
    "hierarchical": ("grove_hierarchical", "hierarchical"),
}
TRAIN_STEP_VARIANT_STRATEGIES = {
    "plain": ("alltoall, plain MoE", "flat"),
    "virtual": ("alltoall, virtual adjugates", "flat"),
    "group_aware": ("grove_alltoall", "flat"),
    "hierarchical": ("grove_hierarchical", "hierarchical"),
}
_GRADIENT_BYTES = 4  # Megatron DDP reduces in an fp32 buffer (grad_reduce_in_fp32)


def emulated_links(spec: LinkSpec) -> Links:
    """The planner's cluster for the emulated one (module docstring)."""
    return Links(gpus_per_node=spec.ranks_per_node, nvlink_gbps=math.inf,
                 rdma_gbps=spec.link_gbps / 8 / spec.ranks_per_node)


def _link_bytes_per_token(row, hidden_bytes: int) -> float:
    """Dispatch + combine bytes one rank sends over the link per token (one pass)."""
    return row["rdma_bytes_per_token"] + row["rdma_copies_per_token"] * hidden_bytes


def _rows_by_strategy(rows: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["strategy"], r["route"]): r for r in rows}


def project_layer_on_links(spec: LinkSpec, experts: int, topk: int, groups: int, hidden: int,
                           tokens: int, bytes_per_element: int = 4) -> dict[str, dict]:
    """Per dispatch-benchmark variant: ``link_bytes`` (all nodes) and ``link_s`` of one MoE
    layer's forward + backward with ``tokens`` tokens per rank."""
    ep = spec.nodes * spec.ranks_per_node
    rows = _rows_by_strategy([r.as_dict() for r in project_dispatch(
        experts, topk, groups, ep, hidden, bytes_per_element, tokens, microbatches=1,
        moe_layers=1, passes=2, links=emulated_links(spec))])
    out = {}
    for variant, key in DISPATCH_VARIANT_STRATEGIES.items():
        row = rows[key]
        out[variant] = {"link_bytes": 2 * ep * tokens * _link_bytes_per_token(
                            row, hidden * bytes_per_element),
                        "link_s": row["step_s"], "copies_per_token": row["copies_per_token"],
                        "link_copies_per_token": row["rdma_copies_per_token"]}
    return out


def allreduce_link_bytes(buffer_bytes: float, ranks: int, nodes: int) -> float:
    """Bytes a ring all-reduce of ``buffer_bytes`` over ``ranks`` consecutive ranks on
    ``nodes`` nodes sends across the node boundaries (all of them together)."""
    return nodes * 2 * (ranks - 1) / ranks * buffer_bytes


def project_step_on_links(spec: LinkSpec, configs: dict[str, GroveConfig], moe_layers: int,
                          dense_params: int) -> dict[str, dict]:
    """Per training-step-benchmark variant: ``link_bytes`` (all nodes; dispatch and the dense
    gradient all-reduce, also apart) and ``link_s`` of one step."""
    ep = spec.nodes * spec.ranks_per_node
    links = emulated_links(spec)
    grad_bytes = allreduce_link_bytes(dense_params * _GRADIENT_BYTES, ep, spec.nodes)
    grad_s = grad_bytes / spec.nodes / (spec.link_gbps * 1e9 / 8)
    out = {}
    for variant, key in TRAIN_STEP_VARIANT_STRATEGIES.items():
        cfg = configs[variant]
        run = project_run(cfg, moe_layers, ep, links)
        row = _rows_by_strategy(run["rows"])[key]
        hidden_bytes = cfg.model.hidden_size * TORCH_DTYPES[cfg.runtime.dtype].itemsize
        dispatch_bytes = (ep * run["tokens_per_microbatch"] * run["microbatches"]
                          * run["moe_layers"] * run["passes"]
                          * _link_bytes_per_token(row, hidden_bytes))
        out[variant] = {"link_bytes": dispatch_bytes + grad_bytes,
                        "dispatch_link_bytes": dispatch_bytes, "gradient_link_bytes": grad_bytes,
                        "link_s": row["step_s"] + grad_s,
                        "copies_per_token": row["copies_per_token"],
                        "link_copies_per_token": row["rdma_copies_per_token"]}
    return out
