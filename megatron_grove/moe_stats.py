"""Per-step MoE counters read from the model's MoE layers, for the metrics log.

A layer that counts work exposes ``grove_counters``: a dict of python ints accumulated over
the forward passes of a step (e.g. routed token-expert evaluations, adjugate evaluations,
token rows sent through the all-to-all). This module only collects and resets them.
"""

from __future__ import annotations

import torch

__all__ = ["collect_moe_counters", "reset_moe_counters"]


def _counting_layers(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(getattr(m, "grove_counters", None), dict)]


def collect_moe_counters(model: torch.nn.Module) -> dict[str, list[int]]:
    """``{counter_name: [value per MoE layer, in layer order]}`` for this rank."""
    out: dict[str, list[int]] = {}
    for layer in _counting_layers(model):
        for name, value in layer.grove_counters.items():
            out.setdefault(name, []).append(int(value))
    return out


def reset_moe_counters(model: torch.nn.Module) -> None:
    for layer in _counting_layers(model):
        for name in layer.grove_counters:
            layer.grove_counters[name] = 0
