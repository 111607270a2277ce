"""Names and layouts of a carved FFN in Megatron (our ``GPTModel`` with a CMoE router) and the
Hugging Face-style export.

Megatron names are global (one process, EP=1: ``local_experts.{e}`` is routed expert ``e``),
under ``decoder.layers.{i}.mlp.``::

    router.weight [E, H]                                 linear: W; paper: representative gate rows
    router.score_bias [E] (linear) | router.up_weight [E, H] (paper: representative up rows)
    router.expert_scale [E] (u), router.expert_bias [E] (b)
    experts.local_experts.{e}.linear_fc1.weight [2m, H] = [gate; up], .linear_fc2.weight [H, m]
    shared_experts.linear_fc1.weight [2Sm, H], shared_experts.linear_fc2.weight [H, Sm]

The export uses Hugging Face-style names under ``model.layers.{i}.mlp.``: ``router.weight`` and
``router.score_bias`` (linear) or ``router.gate_rows`` and ``router.up_rows`` (paper),
``router.expert_scale``, ``router.expert_bias``, ``experts.{e}.{gate,up,down}_proj.weight``,
``shared_expert.{gate,up,down}_proj.weight``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # cmoe.py builds on these names
    from megatron_grove.carving.cmoe import CarvedFFN

__all__ = ["carved_ffn_to_megatron", "carved_ffn_to_hf", "megatron_cmoe_ffn_to_hf"]

_HF_ROUTER_NAMES = {"weight": "weight", "score_bias": "score_bias", "up_weight": "up_rows",
                    "expert_scale": "expert_scale", "expert_bias": "expert_bias"}
_PAPER_HF_WEIGHT = "gate_rows"  # the paper router's router.weight in the export


def carved_ffn_to_megatron(carved: CarvedFFN, prefix: str,
                           scale: torch.Tensor | None = None,
                           bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Megatron state-dict entries of one carved FFN under ``prefix`` (e.g.
    ``decoder.layers.3.mlp.``); ``scale``/``bias`` ``[E]`` default to zeros (fresh carving)."""
    num_routed = carved.num_routed
    zeros = torch.zeros(num_routed)
    out = {f"{prefix}router.weight": carved.router_weight.clone(),
           f"{prefix}router.expert_scale": (zeros if scale is None else scale).clone(),
           f"{prefix}router.expert_bias": (zeros if bias is None else bias).clone()}
    if carved.router == "paper":
        out[f"{prefix}router.up_weight"] = carved.router_up.clone()
    else:
        out[f"{prefix}router.score_bias"] = carved.router_bias.clone()
    for e in range(num_routed):
        expert = f"{prefix}experts.local_experts.{e}."
        out[expert + "linear_fc1.weight"] = torch.cat([carved.expert_gate[e], carved.expert_up[e]])
        out[expert + "linear_fc2.weight"] = carved.expert_down[e].clone()
    if carved.shared_gate.shape[0]:
        out[f"{prefix}shared_experts.linear_fc1.weight"] = torch.cat([carved.shared_gate,
                                                                      carved.shared_up])
        out[f"{prefix}shared_experts.linear_fc2.weight"] = carved.shared_down.clone()
    return out


def carved_ffn_to_hf(carved: CarvedFFN, prefix: str) -> dict[str, torch.Tensor]:
    """Hugging Face-style export entries of one freshly carved FFN under ``prefix`` (e.g.
    ``model.layers.3.mlp.``)."""
    return megatron_cmoe_ffn_to_hf(carved_ffn_to_megatron(carved, "m."), "m.", prefix)


def megatron_cmoe_ffn_to_hf(state: dict[str, torch.Tensor], mg_prefix: str, hf_prefix: str
                            ) -> dict[str, torch.Tensor]:
    """The CMoE FFN entries of a Megatron global state dict (under ``mg_prefix``) renamed and
    split into the export's names (under ``hf_prefix``); either router."""
    paper = f"{mg_prefix}router.up_weight" in state
    out = {}
    for name, hf_name in _HF_ROUTER_NAMES.items():
        if f"{mg_prefix}router.{name}" in state:
            hf_name = _PAPER_HF_WEIGHT if paper and name == "weight" else hf_name
            out[f"{hf_prefix}router.{hf_name}"] = state[f"{mg_prefix}router.{name}"]
    num_routed = state[f"{mg_prefix}router.weight"].shape[0]
    banks = [(f"experts.local_experts.{e}.", f"experts.{e}.") for e in range(num_routed)]
    if f"{mg_prefix}shared_experts.linear_fc1.weight" in state:
        banks.append(("shared_experts.", "shared_expert."))
    for mg, hf in banks:
        gate, up = state[f"{mg_prefix}{mg}linear_fc1.weight"].chunk(2)
        out[f"{hf_prefix}{hf}gate_proj.weight"] = gate.contiguous()
        out[f"{hf_prefix}{hf}up_proj.weight"] = up.contiguous()
        out[f"{hf_prefix}{hf}down_proj.weight"] = state[f"{mg_prefix}{mg}linear_fc2.weight"]
    return out
