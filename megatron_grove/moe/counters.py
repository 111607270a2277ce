"""Per-step MoE counters read from the model's MoE layers, for the metrics log.

A layer that counts work exposes ``grove_counters``: a dict of python ints accumulated over
the forward passes of a step on this rank (``dispatched_rows``: token rows its dispatcher sent
to other ranks or kept locally, logged as ``copies_sent_per_token``; ``routed_rows``:
(token, expert) rows its experts computed; ``adjugate_rows``: token rows its adjugates
computed, one per (token, group); ``internode_rows`` / ``intranode_rows``: rows its dispatch
sent to another node / to another rank of its node, logged as ``internode_copies_per_token`` /
``intranode_copies_per_token``).
This module sums them over all ranks and divides by the tokens of the global batch. Under
expert tensor parallelism every rank of an expert-tensor-parallel group computes its slice of
the same rows, so the computed rows are counted once per group, not once per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

__all__ = ["collect_moe_counters", "reset_moe_counters"]

PER_TOKEN = {"dispatched_rows": "copies_sent_per_token", "routed_rows": "routed_evals_per_token",
             "adjugate_rows": "adjugate_evals_per_token",
             "internode_rows": "internode_copies_per_token",
             "intranode_rows": "intranode_copies_per_token"}
COMPUTED = ("routed_rows", "adjugate_rows")  # rows every expert-tensor-parallel rank computes


def _counting_layers(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(getattr(m, "grove_counters", None), dict)]


def collect_moe_counters(model: torch.nn.Module, global_tokens: int) -> dict[str, list[float]]:
    """``{"<counter>_per_token": [value per MoE layer]}`` over the whole job (collective)."""
    layers = _counting_layers(model)
    if not layers:
        return {}
    names = [n for n in PER_TOKEN if n in layers[0].grove_counters]
    totals = torch.tensor([[float(layer.grove_counters[n]) for n in names] for layer in layers],
                          dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    etp = parallel_state.get_expert_tensor_parallel_world_size() or 1
    return {PER_TOKEN[n]: (totals[:, i] / (global_tokens * (etp if n in COMPUTED else 1))).tolist()
            for i, n in enumerate(names)}


def reset_moe_counters(model: torch.nn.Module) -> None:
    for layer in _counting_layers(model):
        for name in layer.grove_counters:
            layer.grove_counters[name] = 0
