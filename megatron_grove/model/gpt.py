"""Build the Megatron ``GPTModel`` for a run (dense attention + MoE / Grove MoE FFNs)."""

from __future__ import annotations

import hashlib

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.model.layer_spec import build_decoder_block_spec

__all__ = ["build_gpt_model", "causal_attention_mask", "padded_vocab_size",
           "init_params_layout_independent"]


def causal_attention_mask(seq_length: int, device: torch.device) -> torch.Tensor:
    """``[1, 1, s, s]`` bool, True where attention is masked (the future)."""
    return torch.ones(1, 1, seq_length, seq_length, dtype=torch.bool, device=device).triu(1)


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
    experts per rank. With this, a model is the same function at EP = 1, 2, 4 ... (for a fixed
    TP size). Megatron's init methods are kept: ``output_layer_init_method`` for the attention
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
            torch.manual_seed(_stable_seed(seed, expert or name, shard))
            init(param)


def build_gpt_model(config: GroveTransformerConfig, vocab_size: int, seq_length: int,
                    rotary_base: float = 10000.0, tie_embeddings: bool = False,
                    seed: int = 1234) -> GPTModel:
    """A decoder-only LM. Input ``[b, s]`` token ids -> logits ``[b, s, vocab]`` (or the
    per-token loss ``[b, s]`` when ``labels`` are given). The weights depend on ``seed``
    (and the TP rank), not on the expert/data-parallel layout."""
    model = GPTModel(
        config=config,
        transformer_layer_spec=build_decoder_block_spec(config),
        vocab_size=padded_vocab_size(vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=seq_length,
        pre_process=True,
        post_process=True,
        share_embeddings_and_output_weights=tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(rotary_base),
    )
    init_params_layout_independent(model, config, seed)
    return model
