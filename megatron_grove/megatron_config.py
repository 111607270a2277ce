"""Our typed config -> Megatron-Core's ``TransformerConfig`` (plus the Grove fields).

:class:`GroveTransformerConfig` is Megatron's ``TransformerConfig`` with the fields Grove MoE
adds; every Megatron module receives it unchanged, our own modules read the extra fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from megatron_grove.config import GroveConfig
from megatron_grove.runtime.acceleration import Acceleration, megatron_fields

__all__ = ["GroveTransformerConfig", "to_transformer_config", "TORCH_DTYPES"]

# ``runtime.dtype`` (and the tools' ``--dtype``) -> torch dtype
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class GroveTransformerConfig(TransformerConfig):
    """Megatron ``TransformerConfig`` + Grove MoE.

    Expert-bias balancing is done by :mod:`megatron_grove.moe.balancing`, not by Megatron's
    ``finalize_model_grads``: ``moe_router_enable_expert_bias`` stays False and our router
    keeps the bias when ``moe_bias_update_rule != "none"``.
    """

    moe_num_expert_groups: int = 0
    """G: groups of E/G contiguous experts, each with one adjugate expert (0 = plain MoE)."""

    moe_adjugate_ffn_hidden_size: int = 128
    """Intermediate size of each adjugate SwiGLU expert."""

    moe_adjugate_scale: float = 0.05
    """lam: the scale of the adjugate sum."""

    moe_bias_update_rule: str = "paper"
    """Aux-loss-free balancing: 'paper' (b -= a (F-Q)/RMS(F-Q)), 'megatron' (sign) or 'none'."""

    moe_expert_bias_in_selection: bool = True
    """False: the expert bias is kept (saved, exported) but neither selects nor is updated."""

    moe_norm_topk_prob: bool = True
    """False: the selected experts' weights are not renormalised (HF's norm_topk_prob=false):
    the softmax over all experts at the selection, or the plain sigmoids."""

    moe_router_type: str = "grove"
    """'grove' (:class:`GroveTopKRouter`), 'cmoe' (:class:`CMoERouter`) or 'cmoe_linear'
    (:class:`CMoELinearRouter`): the last two for carved models."""

    moe_grove_dispatcher: str = "alltoall"
    """The Grove layers' dispatch strategy (``moe.token_dispatcher_type``, ``auto`` resolved by
    :attr:`megatron_grove.config.MoEConfig.dispatcher`), a key of
    :data:`megatron_grove.moe.dispatchers.GROVE_DISPATCHERS`: ``alltoall`` / ``allgather``
    (adjugates as extra experts of Megatron's dispatcher), ``grove_alltoall`` (group-aware,
    one row per (token, EP rank)) or ``grove_hierarchical`` (group-aware, one row per (token,
    node) across nodes). Megatron's ``moe_token_dispatcher_type`` is its transport."""

    grove_kernels_backend: str = "torch"
    """'torch' or 'triton': the implementation of :mod:`megatron_grove.kernels` ops (SwiGLU,
    permute, combine)."""

    grove_transformer_engine: bool = False
    """Build TE modules (TEGroupedMLP experts and adjugates); see
    :mod:`megatron_grove.runtime.acceleration`."""


_PLAIN = Acceleration(kernels_backend="torch", transformer_engine=False, fp8=None, fp8_recipe=None)


def to_transformer_config(cfg: GroveConfig, dtype: torch.dtype = torch.float32,
                          use_cpu_initialization: bool = True,
                          acceleration: Optional[Acceleration] = None) -> GroveTransformerConfig:
    """Translate the run config into Megatron's config (layout fields included).
    ``acceleration`` (from :func:`megatron_grove.runtime.acceleration.resolve_acceleration`) picks
    kernels, TE and FP8; None = torch kernels, no TE, no FP8."""
    m, e, p = cfg.model, cfg.moe, cfg.parallel
    acc = acceleration or _PLAIN
    return GroveTransformerConfig(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        ffn_hidden_size=m.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=m.norm_epsilon,
        qk_layernorm=m.qk_layernorm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=m.init_method_std,
        calculate_per_token_loss=cfg.train.per_token_loss,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        use_cpu_initialization=use_cpu_initialization,
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=p.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=p.num_layers_in_last_pipeline_stage,
        pipeline_dtype=dtype,  # what crosses the stages (activations and their gradients)
        expert_model_parallel_size=p.expert_model_parallel_size,
        expert_tensor_parallel_size=p.expert_tensor_parallel,
        context_parallel_size=p.context_parallel_size,
        sequence_parallel=p.sequence_parallel,
        recompute_granularity=None if p.recompute_granularity == "none" else p.recompute_granularity,
        recompute_method=p.recompute_method if p.recompute_granularity == "full" else None,
        recompute_num_layers=p.recompute_num_layers if p.recompute_granularity == "full" else None,
        num_moe_experts=e.num_experts or None,
        moe_ffn_hidden_size=e.ffn_hidden_size if e.num_experts else None,
        moe_router_topk=e.router_topk,
        moe_router_score_function=e.router_score_function,
        # CMoE: softmax over all, then top-k
        moe_router_pre_softmax=e.router_type.startswith("cmoe"),
        # Grove's own strategies (grove_*) ride Megatron's all-to-all dispatcher
        moe_token_dispatcher_type="alltoall" if e.dispatcher.startswith("grove_") else e.dispatcher,
        moe_router_load_balancing_type="aux_loss" if e.aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=e.aux_loss_coeff,
        moe_router_enable_expert_bias=False,
        moe_router_bias_update_rate=e.bias_update_rate,
        **megatron_fields(acc, cfg.precision),
        moe_layer_freq=([0] * e.first_k_dense_layers + [1] * (m.num_layers - e.first_k_dense_layers)
                        if e.num_experts else 1),
        moe_num_expert_groups=e.num_expert_groups,
        moe_adjugate_ffn_hidden_size=e.adjugate_ffn_hidden_size,
        moe_adjugate_scale=e.adjugate_scale,
        moe_bias_update_rule=e.bias_update_rule,
        moe_expert_bias_in_selection=e.expert_bias_in_selection,
        moe_norm_topk_prob=e.norm_topk_prob,
        moe_grove_dispatcher=e.dispatcher,
        moe_router_type=e.router_type,
        moe_shared_expert_intermediate_size=e.shared_expert_ffn_hidden_size,
    )
