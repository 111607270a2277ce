"""Carve every FFN of a dense Hugging Face Llama/Qwen-style model (CMoE, training-free).

:func:`calibration_inputs` runs the dense model once over the calibration tokens and records
each decoder layer's FFN input (``[T, H]`` per layer, after the pre-FFN norm);
:func:`carve_model` carves every layer's FFN from them (:func:`~megatron_grove.cmoe.carve_ffn`)
with a progress bar. :func:`carved_run_config` is the :class:`GroveConfig` of the carved model
in our Megatron builder (``moe.router_type: cmoe_linear``, or ``cmoe`` for the paper's router).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_grove.cmoe.carve import ROUTERS, CarvedFFN, carve_ffn
from megatron_grove.config import GroveConfig, MoEConfig, config_from_dict, config_to_dict

__all__ = ["CarveSpec", "calibration_inputs", "carve_model", "carved_run_config"]


@dataclass(frozen=True)
class CarveSpec:
    """SxAyEz: ``shared`` S, ``active`` A routed experts per token, ``experts`` N in total."""

    shared: int
    active: int
    experts: int
    activation_topk: int | None = None  # K_a; None = d_ffn // 10 (the paper: 1000 of 11008)
    router: str = "linear"  # one of megatron_grove.cmoe.carve.ROUTERS

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"--router {self.router}: allowed {', '.join(ROUTERS)}")
        if not 0 <= self.shared < self.experts:
            raise ValueError(f"--shared {self.shared}: allowed 0..{self.experts - 1} "
                             f"(fewer than --experts {self.experts})")
        if not 1 <= self.active <= self.experts - self.shared:
            raise ValueError(f"--active {self.active}: allowed 1..{self.experts - self.shared} "
                             f"(the routed experts, --experts minus --shared)")

    @property
    def router_type(self) -> str:
        """``moe.router_type`` of the carved model: ``cmoe_linear`` or ``cmoe`` (paper)."""
        return "cmoe" if self.router == "paper" else "cmoe_linear"

    @property
    def name(self) -> str:
        return f"S{self.shared}A{self.active}E{self.experts}"

    def active_neurons(self, d_ffn: int) -> int:
        """K_a: ``activation_topk``, by default ``d_ffn // 10`` (at least 1)."""
        return self.activation_topk or max(1, d_ffn // 10)

    def neurons_per_expert(self, d_ffn: int) -> int:
        """m = ceil(d_ffn / N): the last ``N * m - d_ffn`` slots are zero neurons."""
        return -(-d_ffn // self.experts)


@torch.no_grad()
def calibration_inputs(hf_model: torch.nn.Module, token_ids: torch.Tensor) -> list[torch.Tensor]:
    """``token_ids`` ``[B, S]`` through a dense HF causal LM -> each layer's FFN input
    ``[B * S, H]`` (fp32), in layer order."""
    layers = hf_model.model.layers
    captured: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda _module, args, i=i: captured[i].append(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(layers)]
    try:
        for row in token_ids:
            hf_model(input_ids=row[None])
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(chunks).float() for chunks in captured]


@torch.no_grad()
def carve_model(hf_state: dict[str, torch.Tensor], num_layers: int,
                inputs: list[torch.Tensor], spec: CarveSpec, progress: bool = True
                ) -> list[CarvedFFN]:
    """Carve ``model.layers.{i}.mlp`` of an HF state dict for every layer ``i``."""
    carved = []
    for i in tqdm(range(num_layers), desc=f"carve {spec.name}", unit="layer", disable=not progress):
        mlp = f"model.layers.{i}.mlp."
        w_gate = hf_state[mlp + "gate_proj.weight"]
        carved.append(carve_ffn(w_gate, hf_state[mlp + "up_proj.weight"],
                                hf_state[mlp + "down_proj.weight"], inputs[i],
                                spec.shared, spec.experts, spec.active_neurons(w_gate.shape[0]),
                                router=spec.router))
    return carved


def carved_run_config(dense: GroveConfig, spec: CarveSpec, seq_length: int,
                      tokenizer_dir: str) -> GroveConfig:
    """Our run config of the carved model, from the dense model's (``moe.num_experts == 0``,
    e.g. :func:`~megatron_grove.hf_conversion.hf_config.grove_config_from_hf`)."""
    cfg = copy.deepcopy(dense)
    m = spec.neurons_per_expert(cfg.model.ffn_hidden_size)
    cfg.model.seq_length = seq_length
    cfg.moe = MoEConfig(num_experts=spec.experts - spec.shared, router_topk=spec.active,
                        ffn_hidden_size=m, router_type=spec.router_type, num_expert_groups=0,
                        shared_expert_ffn_hidden_size=spec.shared * m if spec.shared else None,
                        router_score_function="softmax", bias_update_rule="paper")
    cfg.parallel.expert_model_parallel_size = 1
    cfg.data.tokenizer = tokenizer_dir
    return config_from_dict(config_to_dict(cfg))  # validated
