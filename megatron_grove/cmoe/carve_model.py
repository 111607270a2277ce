"""Carve every FFN of a dense Hugging Face Llama/Qwen-style model (CMoE, training-free).

:func:`dense_model` builds the dense ``transformers`` model straight from a config and a state
dict (no files); :func:`calibration_activations` runs it once over all calibration windows (one
batch, no LM head) and records each decoder layer's FFN input ``x`` (``[T, H]``, after the
pre-FFN norm) and hidden activations ``h = silu(x W_g^T) * (x W_u^T)`` (``[T, d_ffn]``, the
down projection's input); :func:`carve_model` carves every layer's FFN from them
(:func:`~megatron_grove.cmoe.carve_ffn`) with a progress bar. :func:`carved_run_config` is the
:class:`GroveConfig` of the carved model in our Megatron builder (``moe.router_type:
cmoe_linear``, or ``cmoe`` for the paper's router).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from tqdm import tqdm

from megatron_grove.cmoe.carve import ROUTERS, CarvedFFN, carve_ffn
from megatron_grove.config import GroveConfig, MoEConfig, config_from_dict, config_to_dict

__all__ = ["CarveSpec", "dense_model", "calibration_activations", "carve_model",
           "carved_run_config"]


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


def dense_model(hf_config: dict, hf_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The dense Hugging Face causal LM of ``hf_config`` (a ``config.json`` dict) holding
    ``hf_state`` (fp32, eval mode), built without random initialisation or a file round trip."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "torch_dtype"})
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"dense model: tensors missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} for a {hf_config.get('model_type')} config")
    model.tie_weights()
    return model.eval()


@torch.no_grad()
def calibration_activations(hf_model: torch.nn.Module, token_ids: torch.Tensor
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``token_ids`` ``[B, S]`` through a dense HF causal LM's decoder (one batch, no LM head)
    -> (each layer's FFN input ``[B * S, H]``, each layer's hidden activations
    ``[B * S, d_ffn]``), fp32, in layer order."""
    layers = hf_model.model.layers
    inputs: list[torch.Tensor] = [None] * len(layers)
    hidden: list[torch.Tensor] = [None] * len(layers)

    def keep(store: list, i: int):
        def hook(_module, args):
            store[i] = args[0].reshape(-1, args[0].shape[-1]).float()
        return hook

    hooks = [hook for i, layer in enumerate(layers)
             for hook in (layer.mlp.register_forward_pre_hook(keep(inputs, i)),
                          layer.mlp.down_proj.register_forward_pre_hook(keep(hidden, i)))]
    try:
        hf_model.model(input_ids=token_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, hidden


@torch.no_grad()
def carve_model(hf_state: dict[str, torch.Tensor], num_layers: int,
                inputs: list[torch.Tensor], spec: CarveSpec, progress: bool = True,
                hidden: list[torch.Tensor] | None = None) -> list[CarvedFFN]:
    """Carve ``model.layers.{i}.mlp`` of an HF state dict for every layer ``i`` from its
    calibration ``inputs[i]`` (and ``hidden[i]``, computed from them when not given)."""
    carved = []
    for i in tqdm(range(num_layers), desc=f"carve {spec.name}", unit="layer", disable=not progress):
        mlp = f"model.layers.{i}.mlp."
        w_gate = hf_state[mlp + "gate_proj.weight"]
        carved.append(carve_ffn(w_gate, hf_state[mlp + "up_proj.weight"],
                                hf_state[mlp + "down_proj.weight"], inputs[i],
                                spec.shared, spec.experts, spec.active_neurons(w_gate.shape[0]),
                                router=spec.router,
                                hidden=None if hidden is None else hidden[i]))
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
