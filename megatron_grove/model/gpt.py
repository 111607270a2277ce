"""Build the Megatron ``GPTModel`` for a run (dense attention + MoE / Grove MoE FFNs)."""

from __future__ import annotations

import hashlib

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.model.layer_spec import build_decoder_block_spec

__all__ = ["build_gpt_model", "causal_attention_mask", "gpt_logits", "padded_vocab_size",
           "init_params_layout_independent"]


def causal_attention_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True where attention is masked (the future)."""
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device).triu(1)


@torch.no_grad()
def gpt_logits(model: torch.nn.Module, ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Our ``GPTModel``'s logits over the true vocabulary, fp32: ``ids`` ``[b, L]`` (on the
    model's device) -> ``[b, L, vocab_size]``."""
    length = ids.shape[1]
    mask = causal_attention_mask(length, ids.device)
    positions = torch.arange(length, device=ids.device).unsqueeze(0).expand_as(ids)
    return model(ids, positions, mask)[..., :vocab_size].float()


# Megatron pads the vocabulary to a multiple of 128 x TP, so the embedding and output-layer
# shapes, and with them every checkpoint, depend on the TP size. We pad for the largest usual TP
# size instead: a checkpoint then loads at any TP <= 8.
VOCAB_PAD_TP = 8


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """The vocabulary rounded up to a multiple of ``multiple x max(TP, VOCAB_PAD_TP)``: every
    TP shard has the same, aligned size, and for TP <= 8 the size does not depend on TP."""
    step = multiple * max(tensor_parallel, VOCAB_PAD_TP)
    return ((vocab_size + step - 1) // step) * step


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _global_layer_names(model: GPTModel) -> dict[int, str]:
    """``id(param) -> name`` of every decoder-layer parameter with the stage's layer index
    replaced by the global one (Megatron's 1-based ``layer_number`` - 1), and the last
    stage's copy of tied embeddings named as the embedding it copies."""
    names: dict[int, str] = {}
    for layer in model.decoder.layers:
        for name, param in layer.named_parameters():
            names[id(param)] = f"decoder.layers.{layer.layer_number - 1}.{name}"
    if model.share_embeddings_and_output_weights and not model.pre_process \
            and model.post_process:
        names[id(model.output_layer.weight)] = "embedding.word_embeddings.weight"
    return names


def _global_expert_names(model: torch.nn.Module) -> dict[int, str]:
    """``id(param) -> name`` with local expert indices replaced by global ones, for routed
    experts and, on Grove layers, adjugates (group j lives on EP rank j // (G / ep))."""
    names: dict[int, str] = {}
    for layer in model.modules():
        if not isinstance(layer, MoELayer):
            continue
        ep_rank = layer.local_expert_indices[0] // layer.num_local_experts
        banks = [("experts", layer.experts)]
        if getattr(layer, "adjugate_experts", None) is not None:
            banks.append(("adjugate_experts", layer.adjugate_experts))
        for bank_name, bank in banks:
            if not isinstance(bank, SequentialMLP):
                continue
            per_rank = len(bank.local_experts)
            for i, expert in enumerate(bank.local_experts):
                for name, param in expert.named_parameters():
                    names[id(param)] = (f"layer{layer.layer_number}.{bank_name}."
                                        f"{ep_rank * per_rank + i}.{name}")
    return names


@torch.no_grad()
def init_params_layout_independent(model: torch.nn.Module, config: GroveTransformerConfig,
                                   seed: int) -> None:
    """Re-initialise every weight from a seed of (seed, global parameter name, TP rank of a
    TP-split weight: the expert-TP rank for routed experts and adjugates; 0 for a weight
    replicated over TP, such as the router).

    Megatron seeds expert initialisation per EP rank, and its CPU initialisation draws experts
    from the default stream, so the layers after the first MoE layer change with the number of
    experts per rank. With this, a model is the same function at EP = 1, 2, 4 ... and at any
    pipeline split (for a fixed TP size): names are global (layer and expert indices).
    Megatron's init methods are kept: ``output_layer_init_method`` for the attention
    output and FFN down projections, ``init_method`` for the other matrices; norm weights keep
    their ones. So the experts at ETP = 1 and the routers are those of TP = 1, whatever
    attention's TP size (before, each TP rank drew its own router, kept diverged copies in
    training, and a resume replaced them all with TP rank 0's).
    """
    from megatron.core import parallel_state

    if not config.perform_initialization:
        return
    initialised = parallel_state.model_parallel_is_initialized()
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if initialised else 0
    etp_rank = parallel_state.get_expert_tensor_parallel_rank() if initialised else 0
    expert_names = _global_expert_names(model)
    global_names = {**_global_layer_names(model), **expert_names}
    for name, param in model.named_parameters():
        if "norm" in name or param.dim() < 2:
            continue
        scaled = name.endswith("linear_fc2.weight") or name.endswith("linear_proj.weight")
        init = config.output_layer_init_method if scaled else config.init_method
        expert = expert_names.get(id(param))
        # a TP-split weight draws its shard by (expert-)TP rank; a replicated one (the router)
        # must be the same on every TP rank: it is saved once and loaded by all
        split = getattr(param, "tensor_model_parallel", False)
        shard = (tp_rank if expert is None else etp_rank) if split else 0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_stable_seed(seed, global_names.get(id(param), name), shard))
            init(param)


def build_gpt_model(config: GroveTransformerConfig, vocab_size: int, seq_length: int,
                    rotary_base: float = 10000.0, tie_embeddings: bool = False,
                    seed: int = 1234, vp_stage: int | None = None) -> GPTModel:
    """A decoder-only LM. Input ``[b, s]`` token ids -> logits ``[b, s, vocab]`` (or the
    per-token loss ``[b, s]`` when ``labels`` are given). The weights depend on ``seed``
    (and the TP rank), not on the expert/data-parallel/pipeline layout.

    Under pipeline parallelism this is the rank's stage (its model chunk ``vp_stage`` under
    the interleaved schedule), as Megatron places it: the embedding on the first stage
    (``pre_process``), the final norm and output layer on the last (``post_process``), hidden
    states ``[s, b, h]`` in and out elsewhere; tied embeddings keep a copy of the embedding on
    the last stage, whose gradients Megatron all-reduces with the first stage's."""
    from megatron.core import parallel_state

    staged = config.pipeline_model_parallel_size > 1
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_decoder_block_spec(config, vp_stage),
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=seq_length,
        pre_process=not staged or parallel_state.is_pipeline_first_stage(
            ignore_virtual=False, vp_stage=vp_stage),
        post_process=not staged or parallel_state.is_pipeline_last_stage(
            ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(rotary_base),
        vp_stage=vp_stage,
    )
    init_params_layout_independent(model, config, seed)
    return model
