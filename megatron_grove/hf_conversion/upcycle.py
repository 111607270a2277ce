"""The paper's upcycling: a (Qwen3-)MoE model -> Grove MoE computing exactly the same function.

Every weight is copied; each MoE layer gains ``G`` adjugate experts whose gate/up rows are
drawn from ``N(0, std^2)`` (``std`` = 0.006) and whose down projection is zero, so each
adjugate outputs 0 and the model's output is unchanged at step 0, and a zero expert bias.
(Selection becomes top-k of ``sigmoid(logits) + bias`` instead of top-k of the logits: the
same experts, since sigmoid is increasing, unless fp32 sigmoid saturates two logits above ~16
to the same value.)
"""

from __future__ import annotations

from typing import Mapping

import torch

from megatron_grove.config import ConfigError, GroveConfig, config_from_dict, config_to_dict

__all__ = ["upcycle_to_grove", "ADJUGATE_INIT_STD"]

ADJUGATE_INIT_STD = 0.006


def upcycle_to_grove(cfg: GroveConfig, state: Mapping[str, torch.Tensor], num_groups: int,
                     adjugate_ffn_hidden_size: int, adjugate_scale: float, seed: int = 0,
                     std: float = ADJUGATE_INIT_STD) -> tuple[GroveConfig, dict[str, torch.Tensor]]:
    """(config, global state dict) of an MoE model without groups -> those of the Grove model
    (``G = num_groups`` groups, adjugate FFN size ``Fa``, ``lam = adjugate_scale``). Raises
    :class:`~megatron_grove.config.ConfigError` for a dense or already-Grove model or a shape
    the config validation refuses (e.g. ``G`` not dividing ``E``, ``lam > G/E``)."""
    if not cfg.moe.num_experts:
        raise ConfigError("--upcycle-grove needs an MoE input (Qwen3-MoE); this model is dense")
    if cfg.moe.num_expert_groups:
        raise ConfigError("--upcycle-grove: the input is already a Grove MoE model "
                          f"({cfg.moe.num_expert_groups} groups)")
    data = config_to_dict(cfg)
    data["moe"].update(num_expert_groups=num_groups,
                       adjugate_ffn_hidden_size=adjugate_ffn_hidden_size,
                       adjugate_scale=adjugate_scale, bias_update_rule="paper")
    new_cfg = config_from_dict(data)  # validated
    out = dict(state)
    gen = torch.Generator().manual_seed(seed)
    H, E, Fa = cfg.model.hidden_size, cfg.moe.num_experts, adjugate_ffn_hidden_size
    for i in range(cfg.model.num_layers):
        prefix = f"decoder.layers.{i}.mlp"
        if f"{prefix}.router.weight" not in state:
            continue  # a dense layer
        dtype = state[f"{prefix}.router.weight"].dtype
        out[f"{prefix}.router.expert_bias"] = torch.zeros(E, dtype=torch.float32)
        for g in range(num_groups):
            expert = f"{prefix}.adjugate_experts.local_experts.{g}"
            out[f"{expert}.linear_fc1.weight"] = (
                torch.randn(2 * Fa, H, generator=gen) * std).to(dtype)
            out[f"{expert}.linear_fc2.weight"] = torch.zeros(H, Fa, dtype=dtype)
    return new_cfg, out
