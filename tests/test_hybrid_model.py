"""Megatron's HybridModel (GPTModel's successor in megatron-core 0.19): what keeps our layers
out of it on CPU (docs/design.md, "Megatron's HybridModel: why not yet")."""

from processes import in_world


def _build_hybrid_stack_of_our_layers() -> str:
    """Our attention and Grove MoE layers as HybridStack's ``*`` and ``E`` layers (the local
    CPU spec), pattern ``*E*E``: what building the stack raises."""
    import dataclasses

    from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_layer import (
        MoETransformerLayer,
        TransformerLayer,
        TransformerLayerSubmodules,
    )

    from config_builders import transformer_config
    from megatron_grove.model.layer_spec import build_decoder_block_spec

    config = transformer_config(moe__num_expert_groups=4, moe__adjugate_scale=0.5)
    ours = build_decoder_block_spec(config).layer_specs[-1].submodules
    attention = ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=ours.input_layernorm, self_attention=ours.self_attention,
        self_attn_bda=ours.self_attn_bda))
    moe = ModuleSpec(module=MoETransformerLayer, submodules=TransformerLayerSubmodules(
        pre_mlp_layernorm=ours.pre_mlp_layernorm, mlp=ours.mlp, mlp_bda=ours.mlp_bda))
    spec = ModuleSpec(module=HybridStack, submodules=HybridStackSubmodules(
        attention_layer=attention, moe_layer=moe))
    try:
        build_module(spec, config=dataclasses.replace(config, num_layers=2 * config.num_layers),
                     layer_type_list=list("*E" * config.num_layers),
                     pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    except ImportError as exc:
        return str(exc)
    return "built"


def test_hybrid_stack_needs_transformer_engine_for_its_final_norm():
    """The blocker: HybridStack builds its final norm as TENorm whatever the spec says, so no
    local (TE-free) spec builds on CPU. When this fails, upstream has lifted it: move on."""
    outcome = in_world(_build_hybrid_stack_of_our_layers)
    assert "Transformer Engine is not installed" in outcome
    assert "when instantiating HybridStack" in outcome
