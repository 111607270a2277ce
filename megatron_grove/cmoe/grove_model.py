"""Carving a whole dense model into a Grove MoE: every layer's FFN
(:func:`~megatron_grove.cmoe.grove_carving.carve_grove_ffn`), its Megatron tensors and the run
config our trainer loads it with (``moe.router_type: cmoe_linear`` or ``cmoe``, with
``moe.num_expert_groups: G``).

Megatron names under ``decoder.layers.{i}.mlp.``: the CMoE carving's (router, routed experts,
shared expert; :mod:`megatron_grove.cmoe.weights`) plus, per group ``g``,
``adjugate_experts.local_experts.{g}.linear_fc1.weight`` ``[2a, H]`` (= [gate; up]) and
``.linear_fc2.weight`` ``[H, a]``.
"""

from __future__ import annotations

import copy

import torch
from tqdm import tqdm

from megatron_grove.cmoe.grove_carving import CarvedGroveFFN, GroveCarveSpec, carve_grove_ffn
from megatron_grove.cmoe.weights import carved_ffn_to_megatron
from megatron_grove.config import GroveConfig, MoEConfig, config_from_dict, config_to_dict

__all__ = ["carve_grove_model", "carved_grove_ffn_to_megatron", "grove_run_config"]


@torch.no_grad()
def carve_grove_model(hf_state: dict[str, torch.Tensor], num_layers: int,
                      inputs: list[torch.Tensor], spec: GroveCarveSpec, progress: bool = True,
                      hidden: list[torch.Tensor] | None = None) -> list[CarvedGroveFFN]:
    """Carve ``model.layers.{i}.mlp`` of an HF state dict for every layer ``i`` (``inputs[i]``
    ``[T, H]``: that FFN's calibration inputs; ``hidden[i]`` ``[T, d_ffn]`` its activations,
    computed from them when not given)."""
    carved = []
    for i in tqdm(range(num_layers), desc=f"carve {spec.name}", unit="layer",
                  disable=not progress):
        mlp = f"model.layers.{i}.mlp."
        carved.append(carve_grove_ffn(hf_state[mlp + "gate_proj.weight"],
                                      hf_state[mlp + "up_proj.weight"],
                                      hf_state[mlp + "down_proj.weight"], inputs[i], spec,
                                      hidden=None if hidden is None else hidden[i]))
    return carved


def carved_grove_ffn_to_megatron(carved: CarvedGroveFFN, prefix: str) -> dict[str, torch.Tensor]:
    """Megatron state-dict entries of one freshly carved Grove FFN under ``prefix`` (e.g.
    ``decoder.layers.3.mlp.``), EP=1 names (module docstring)."""
    out = carved_ffn_to_megatron(carved.routed, prefix)
    for g in range(carved.adjugate_gate.shape[0]):
        adjugate = f"{prefix}adjugate_experts.local_experts.{g}."
        out[adjugate + "linear_fc1.weight"] = torch.cat([carved.adjugate_gate[g],
                                                         carved.adjugate_up[g]])
        out[adjugate + "linear_fc2.weight"] = carved.adjugate_down[g].clone()
    return out


def grove_run_config(dense: GroveConfig, spec: GroveCarveSpec, seq_length: int,
                     tokenizer_dir: str) -> GroveConfig:
    """Our run config of the Grove carving of a dense model (``moe.num_experts == 0``, e.g.
    :func:`~megatron_grove.hf_conversion.hf_config.grove_config_from_hf`)."""
    cfg = copy.deepcopy(dense)
    d_ffn = cfg.model.ffn_hidden_size
    shared = spec.shared_neurons(d_ffn)
    cfg.model.seq_length = seq_length
    cfg.moe = MoEConfig(num_experts=spec.routed, router_topk=spec.active,
                        ffn_hidden_size=spec.neurons_per_expert(d_ffn),
                        router_type=spec.router_type,
                        num_expert_groups=spec.groups, adjugate_ffn_hidden_size=spec.adjugate,
                        adjugate_scale=spec.adjugate_scale,
                        shared_expert_ffn_hidden_size=shared or None,
                        router_score_function="softmax", bias_update_rule="paper")
    cfg.parallel.expert_model_parallel_size = 1
    cfg.data.tokenizer = tokenizer_dir
    return config_from_dict(config_to_dict(cfg))  # validated
