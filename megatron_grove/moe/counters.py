"""Per-step MoE counters read from the model's MoE layers, for the metrics log.

A layer that counts work exposes ``grove_counters``: a dict of python ints accumulated over
the forward passes of a step on this rank (``dispatched_rows``: token rows its dispatcher sent
to other ranks or kept locally, logged as ``copies_sent_per_token``; ``routed_rows``:
(token, expert) rows its experts computed; ``adjugate_rows``: token rows its adjugates
computed, one per (token, group); ``internode_rows`` / ``intranode_rows``: rows its dispatch
sent to another node / to another rank of its node, logged as ``internode_copies_per_token`` /
``intranode_copies_per_token``).
This module sums them over all ranks (per layer, by its global number: under pipeline
parallelism each stage holds other layers) and divides by the tokens of the global batch. Under
expert tensor parallelism every rank of an expert-tensor-parallel group computes its slice of
the same rows, so the computed rows are counted once per group, not once per rank.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megatron_grove.runtime.distributed import objects_from_all_ranks

__all__ = ["collect_moe_counters", "reset_moe_counters"]

PER_TOKEN = {"dispatched_rows": "copies_sent_per_token", "routed_rows": "routed_evals_per_token",
             "adjugate_rows": "adjugate_evals_per_token",
             "internode_rows": "internode_copies_per_token",
             "intranode_rows": "intranode_copies_per_token"}
COMPUTED = ("routed_rows", "adjugate_rows")  # rows every expert-tensor-parallel rank computes


def _counting_layers(model_chunks: torch.nn.Module | list[torch.nn.Module]):
    chunks = model_chunks if isinstance(model_chunks, list) else [model_chunks]
    return [m for chunk in chunks for m in chunk.modules()
            if isinstance(getattr(m, "grove_counters", None), dict)]


def collect_moe_counters(model_chunks: torch.nn.Module | list[torch.nn.Module],
                         global_tokens: int) -> dict[str, list[float]]:
    """``{"<counter>_per_token": [value per MoE layer]}`` over the whole job (collective; the
    layers of every pipeline stage, keyed by Megatron's global ``layer_number``)."""
    local = {layer.layer_number: {n: layer.grove_counters[n] for n in PER_TOKEN}
             for layer in _counting_layers(model_chunks)}
    totals: dict[int, dict[str, int]] = {}
    for rows in objects_from_all_ranks(local):
        for number, counts in rows.items():
            row = totals.setdefault(number, dict.fromkeys(PER_TOKEN, 0))
            for name, value in counts.items():
                row[name] += value
    if not totals:
        return {}
    etp = parallel_state.get_expert_tensor_parallel_world_size() or 1
    return {PER_TOKEN[n]: [totals[layer][n] / (global_tokens * (etp if n in COMPUTED else 1))
                           for layer in sorted(totals)] for n in PER_TOKEN}


def reset_moe_counters(model_chunks: torch.nn.Module | list[torch.nn.Module]) -> None:
    for layer in _counting_layers(model_chunks):
        for name in layer.grove_counters:
            layer.grove_counters[name] = 0
