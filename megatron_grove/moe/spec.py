"""Building an MoE layer of a run: :func:`build_moe_layer`, and the layer-spec hook that puts it
into Megatron's decoder spec (:func:`moe_layer_builder`).

Every MoE layer routes with :class:`~megatron_grove.moe.router.GroveTopKRouter`
(:class:`~megatron_grove.moe.cmoe_router.CMoERouter` / ``CMoELinearRouter`` when
``moe_router_type`` is ``'cmoe'`` / ``'cmoe_linear'``: :data:`ROUTERS`) and is a
:class:`~megatron_grove.moe.layer.GroveMoELayer` when ``moe_num_expert_groups > 0`` (Megatron's
``MoELayer`` otherwise). With ``grove_kernels_backend == "triton"`` its experts (and shared
experts) get the :class:`~megatron_grove.kernels.swiglu.SwiGLU` activation module. The experts
class is the one Megatron's spec picks (``SequentialMLP``; ``TEGroupedMLP`` with TE).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules

from megatron_grove.kernels.swiglu import SwiGLU
from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.cmoe_router import CMoELinearRouter, CMoERouter
from megatron_grove.moe.layer import GroveMoELayer
from megatron_grove.moe.router import GroveTopKRouter

__all__ = ["ROUTERS", "build_moe_layer", "moe_layer_builder", "with_swiglu_module"]

# moe.router_type (GroveTransformerConfig.moe_router_type) -> router class
ROUTERS: dict[str, type[GroveTopKRouter]] = {
    "grove": GroveTopKRouter,
    "cmoe": CMoERouter,
    "cmoe_linear": CMoELinearRouter,
}


def with_swiglu_module(builder: functools.partial) -> functools.partial:
    """An MLP / experts builder (a partial with ``submodules``) whose MLP submodules use our
    SwiGLU activation module (Megatron's ``MLPSubmodules.activation_func`` hook)."""
    submodules = dataclasses.replace(builder.keywords["submodules"], activation_func=SwiGLU)
    return functools.partial(builder.func, *builder.args,
                             **{**builder.keywords, "submodules": submodules})


def _stock_submodules(config: GroveTransformerConfig) -> MoESubmodules:
    """Megatron's MoE submodules for ``config`` (local modules, or TE's)."""
    spec = get_moe_module_spec(use_te=config.grove_transformer_engine,
                               num_experts=config.num_moe_experts,
                               moe_grouped_gemm=config.moe_grouped_gemm)
    return spec.keywords["submodules"]


def build_moe_layer(config: GroveTransformerConfig, submodules: Optional[MoESubmodules] = None,
                    pg_collection: Optional[ProcessGroupCollection] = None,
                    is_mtp_layer: bool = False, name: Optional[str] = None,
                    layer_number: Optional[int] = None) -> MoELayer:
    """The MoE layer ``config`` describes (module docstring): ``forward(hidden [S, B, H]) ->
    (output [S, B, H], None)``. ``submodules``: Megatron's MoE submodules from a layer spec
    (None: Megatron's MoE spec for ``config``); the router and activation are ours."""
    submodules = submodules or _stock_submodules(config)
    submodules = dataclasses.replace(submodules, router=ROUTERS[config.moe_router_type])
    if config.grove_kernels_backend == "triton":
        submodules = dataclasses.replace(
            submodules, experts=with_swiglu_module(submodules.experts),
            shared_experts=(with_swiglu_module(submodules.shared_experts)
                            if submodules.shared_experts is not None else None))
    layer_cls = GroveMoELayer if config.moe_num_expert_groups > 0 else MoELayer
    return layer_cls(config, submodules=submodules, layer_number=layer_number,
                     pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, name=name)


def moe_layer_builder(stock: functools.partial) -> functools.partial:
    """The layer-spec hook: Megatron's MoE layer builder (``partial(MoELayer, submodules=...)``
    from its GPT spec) -> ours (:func:`build_moe_layer` with the same submodules)."""
    return functools.partial(build_moe_layer, submodules=stock.keywords["submodules"])
