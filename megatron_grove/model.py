"""Build the Megatron ``GPTModel`` for a run (dense attention + MoE / Grove MoE FFNs)."""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel

from megatron_grove.layer_spec import build_decoder_block_spec
from megatron_grove.megatron_config import GroveTransformerConfig

__all__ = ["build_gpt_model", "padded_vocab_size"]


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = 128) -> int:
    """Round the vocabulary up so every TP shard has the same, aligned size (as Megatron does)."""
    step = multiple * tensor_parallel
    return ((vocab_size + step - 1) // step) * step


def build_gpt_model(config: GroveTransformerConfig, vocab_size: int, seq_length: int,
                    rotary_base: float = 10000.0, tie_embeddings: bool = False) -> GPTModel:
    """A decoder-only LM. Input ``[b, s]`` token ids -> logits ``[b, s, vocab]`` (or the
    per-token loss ``[b, s]`` when ``labels`` are given)."""
    return GPTModel(
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
