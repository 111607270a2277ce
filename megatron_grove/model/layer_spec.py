"""The decoder block spec: Megatron's GPT spec with our MoE layers plugged in.

Megatron's ``get_gpt_decoder_block_spec`` already lays out dense vs MoE layers from
``moe_layer_freq`` (our ``moe.first_k_dense_layers``); each MoE layer's builder becomes
:func:`megatron_grove.moe.build_moe_layer` through the hook
:func:`megatron_grove.moe.spec.moe_layer_builder` (our routers, Grove layers when there are
expert groups).

With ``grove_transformer_engine`` the spec is Megatron's TE spec (TE linears/attention,
``TEGroupedMLP`` experts; :class:`~megatron_grove.moe.GroveMoELayer` builds its adjugates with
the same experts builder, so they run as a TE grouped GEMM too). With ``grove_kernels_backend ==
"triton"`` every MLP (dense, experts, adjugates) gets
:class:`megatron_grove.kernels.swiglu.SwiGLU` as its activation module
(``config.use_te_activation_func`` is set by ``to_transformer_config``).

Megatron's local norm (``WrappedTorchNorm``) refuses sequence parallelism, which Megatron
requires for MoE with tensor parallelism; without TE every norm is a
:class:`SequenceParallelTorchNorm` instead.
"""

from __future__ import annotations

import copy
import dataclasses
import functools

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.spec import moe_layer_builder, with_swiglu_module

__all__ = ["build_decoder_block_spec", "SequenceParallelTorchNorm"]


class SequenceParallelTorchNorm:
    """Megatron's torch norm (``WrappedTorchNorm``) that also works with sequence parallelism.

    Under sequence parallelism a norm sees only its rank's slice of the sequence ([s/tp, b, h]
    in, same shape out), so each TP rank holds a partial gradient of the (replicated) norm
    weight. Megatron all-reduces such gradients over the TP group for every parameter marked
    ``sequence_parallel`` (``finalize_model_grads``), as TE's norms are marked; so is this one.
    Nothing else differs from ``WrappedTorchNorm``, which is built with sequence parallelism
    hidden from its check."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        plain = copy.copy(config)
        plain.sequence_parallel = False
        norm = WrappedTorchNorm(plain, hidden_size, eps, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _use_sequence_parallel_norms(spec: TransformerBlockSubmodules) -> None:
    """Every ``WrappedTorchNorm`` of the local spec -> :class:`SequenceParallelTorchNorm`."""
    for submodules in (spec, *(layer.submodules for layer in spec.layer_specs),
                       *(layer.submodules.self_attention.submodules
                         for layer in spec.layer_specs)):
        for field in dataclasses.fields(submodules):
            if getattr(submodules, field.name) is WrappedTorchNorm:
                setattr(submodules, field.name, SequenceParallelTorchNorm)


def build_decoder_block_spec(config: GroveTransformerConfig,
                             vp_stage: int | None = None) -> TransformerBlockSubmodules:
    """Per-layer specs of this rank's layers: the whole decoder without pipeline parallelism,
    else Megatron's share of this pipeline stage (and of its model chunk ``vp_stage`` under
    the interleaved schedule)."""
    pp_rank = None if config.pipeline_model_parallel_size > 1 else 0  # None: this rank's stage
    spec = get_gpt_decoder_block_spec(config,
                                      use_transformer_engine=config.grove_transformer_engine,
                                      normalization="RMSNorm", qk_l2_norm=False,
                                      vp_stage=vp_stage, pp_rank=pp_rank)
    if not config.grove_transformer_engine:
        _use_sequence_parallel_norms(spec)
    # Layers of one kind share their submodules object: rewrite each object once.
    for submodules in {id(layer.submodules): layer.submodules
                       for layer in spec.layer_specs}.values():
        mlp = submodules.mlp
        # Dense layers' mlp is a partial of a bound method (MLP.as_mlp_submodule), not a class.
        if (isinstance(mlp, functools.partial) and isinstance(mlp.func, type)
                and issubclass(mlp.func, MoELayer)):
            submodules.mlp = moe_layer_builder(mlp)
        elif config.grove_kernels_backend == "triton":
            submodules.mlp = with_swiglu_module(mlp)
    return spec
