"""Writing a carved model: a model-only Megatron checkpoint our trainer loads (with the run
config to fine-tune it) and a Hugging Face-style export (dense tensors as in the source, FFNs as
CMoE experts and router, ``config.json`` with a ``cmoe`` section, the tokenizer).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import yaml

from megatron_grove.cmoe.carve import CarvedFFN
from megatron_grove.cmoe.carve_model import CarveSpec
from megatron_grove.cmoe.weights import carved_ffn_to_hf, carved_ffn_to_megatron
from megatron_grove.config import GroveConfig, config_to_dict

__all__ = ["write_megatron_checkpoint", "write_run_config", "write_hf_export"]

_ROUTER_SCORES = {  # config.json cmoe.router_scores: how the export's router tensors route
    "linear": "softmax over weight x + score_bias, top-k of scores + expert_bias, weight "
              "1 + score * expert_scale",
    "paper": "softmax over |silu(gate_rows x) * (up_rows x)|, top-k of scores + expert_bias, "
             "weight 1 + score * expert_scale"}


def write_megatron_checkpoint(cfg: GroveConfig, dense_cfg: GroveConfig, hf_state: dict,
                              carved: list, folder: Path,
                              to_megatron: Callable = carved_ffn_to_megatron) -> None:
    """The carved model (config ``cfg``) as a model-only Megatron checkpoint in ``folder``: the
    dense tensors through the HF -> Megatron mapping of the dense model ``dense_cfg``, every FFN
    replaced by ``to_megatron(carved[i], prefix)`` (default: CMoE's experts and router; a Grove
    carving passes :func:`~megatron_grove.cmoe.grove_model.carved_grove_ffn_to_megatron`)."""
    from megatron_grove.hf_conversion.megatron_io import save_megatron_checkpoint
    from megatron_grove.hf_conversion.tensor_mapping import hf_to_megatron
    from megatron_grove.runtime import single_process_world

    state = {name: tensor for name, tensor in hf_to_megatron(hf_state, dense_cfg).items()
             if ".mlp." not in name}
    for i, ffn in enumerate(carved):
        state.update(to_megatron(ffn, f"decoder.layers.{i}.mlp."))
    with single_process_world():
        save_megatron_checkpoint(folder, cfg, state)


def write_run_config(cfg: GroveConfig, folder: Path) -> None:
    """``folder/config.yaml``: the run config to fine-tune the carved model with."""
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def write_hf_export(tokenizer_dir: Path, hf_config: dict, hf_state: dict,
                    carved: list[CarvedFFN], spec: CarveSpec, folder: Path) -> None:
    """The Hugging Face-style export: dense tensors as in ``hf_state``, FFNs as CMoE experts,
    the tokenizer files of ``tokenizer_dir``."""
    from megatron_grove.hf_conversion.safetensors_io import write_hf_checkpoint

    tensors = {k: v for k, v in hf_state.items() if ".mlp." not in k}
    for i, ffn in enumerate(carved):
        tensors.update(carved_ffn_to_hf(ffn, f"model.layers.{i}.mlp."))
    m = spec.neurons_per_expert(hf_config["intermediate_size"])
    config = dict(hf_config, cmoe={
        "num_shared_experts": spec.shared, "num_routed_experts": spec.experts - spec.shared,
        "num_experts_per_tok": spec.active, "expert_intermediate_size": m,
        "dense_intermediate_size": hf_config["intermediate_size"],
        "router": spec.router, "router_scores": _ROUTER_SCORES[spec.router]})
    write_hf_checkpoint(folder, config, tensors, tokenizer_dir=tokenizer_dir)
