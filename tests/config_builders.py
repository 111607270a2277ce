"""Configs built through the config path, as runs build them: Megatron's config from dotted keys
(:func:`transformer_config`), the Grove configs of ``configs/`` at a CPU size
(:func:`grove_family_config`) and the one-layer router config (:func:`router_config`)."""

from __future__ import annotations

from typing import Any

from megatron_grove.config import load_config
from megatron_grove.megatron_config import GroveTransformerConfig, to_transformer_config
from megatron_grove.runtime.acceleration import resolve_acceleration
from processes import ROOT

HIDDEN = 16  # hidden size of the small layer and router cases


def transformer_config(device: str = "cpu", **keys: Any) -> GroveTransformerConfig:
    """Megatron's config of ``load_config(None, overrides)`` with the fast paths resolved for
    ``device``; the overrides are keyword arguments with ``__`` for the section dot:
    ``transformer_config(moe__num_experts=8)``."""
    overrides = [f"{key.replace('__', '.')}={value}" for key, value in keys.items()]
    cfg = load_config(None, overrides)
    return to_transformer_config(cfg, acceleration=resolve_acceleration(cfg, device))


# Every Grove config of configs/ at a CPU-sized width and depth: the same experts, top-k,
# groups, adjugate fields, score function and balancing (the tiny config as it is, with the
# shipped tokenizer's vocabulary, as training sets it).
# grovemoe_33b_a3b_1node_proxy.yaml is grovemoe_33b_a3b.yaml with 12 layers: the same family.
REDUCED_WIDTH = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                 "model.num_query_groups=1", "model.kv_channels=16", "model.ffn_hidden_size=96",
                 "model.seq_length=64", "model.vocab_size=512", "moe.ffn_hidden_size=16"]
GROVE_CONFIG_FAMILIES = {
    "tiny_cpu": (ROOT / "configs" / "tiny_cpu.yaml", ["model.vocab_size=4096"]),
    "grovemoe_33b_a3b": (ROOT / "configs" / "grovemoe_33b_a3b.yaml", REDUCED_WIDTH),
    "grovemoe_33b_g16": (ROOT / "configs" / "grovemoe_33b_g16.yaml", REDUCED_WIDTH),
}


def grove_family_config(name: str, *overrides: str):
    """The config of family ``name`` (:data:`GROVE_CONFIG_FAMILIES`) + ``overrides``, on one CPU
    process in fp32."""
    path, reduced = GROVE_CONFIG_FAMILIES[name]
    return load_config(path, [*reduced, "runtime.device=cpu", "runtime.dtype=fp32",
                              "parallel.expert_model_parallel_size=1",
                              "parallel.use_distributed_optimizer=false",
                              "parallel.recompute_granularity=none", *overrides])


ROUTER_EXPERTS = 8


def router_config(score_function: str = "softmax", rule: str = "paper", topk: int = 2,
                  aux_loss_coeff: float = 0.0, norm_topk_prob: bool = True,
                  bias_in_selection: bool = True, **megatron_fields: Any) -> GroveTransformerConfig:
    """A one-layer MoE config (hidden ``HIDDEN``, 8 experts) for router tests;
    ``megatron_fields`` set Megatron fields no YAML key reaches (to test refusals)."""
    config = transformer_config(
        model__num_layers=1, model__hidden_size=HIDDEN, model__num_attention_heads=1,
        moe__num_experts=ROUTER_EXPERTS, moe__ffn_hidden_size=8, moe__router_topk=topk,
        moe__router_score_function=score_function, moe__aux_loss_coeff=aux_loss_coeff,
        moe__bias_update_rule=rule, moe__norm_topk_prob=str(norm_topk_prob).lower(),
        moe__expert_bias_in_selection=str(bias_in_selection).lower())
    for name, value in megatron_fields.items():
        setattr(config, name, value)
    return config


# A small EP=2 run of the tiny config, for checkpoint tests (forked gloo workers).
SMALL_RUN = ["model.seq_length=16", "model.hidden_size=32", "model.num_attention_heads=2",
             "model.num_query_groups=1", "model.ffn_hidden_size=64", "moe.ffn_hidden_size=32",
             "train.iters=4", "train.lr_warmup_iters=1", "parallel.expert_model_parallel_size=2"]


def small_model_and_optimizer(*overrides: str):
    """In a running world: the SMALL_RUN model (+ ``overrides``) and its optimizer after one
    (zero-gradient) optimizer step, so Adam state exists as in a real checkpoint."""
    import torch

    from megatron_grove.runtime import current_runtime
    from megatron_grove.training import setup_training

    setup = setup_training(load_config(ROOT / "configs" / "tiny_cpu.yaml",
                                       [*SMALL_RUN, *overrides]),
                           current_runtime(torch.device("cpu")))
    setup.model.zero_grad_buffer()
    setup.optimizer.step()
    return setup.model, setup.optimizer

