"""Tiny random ``transformers`` models (the peer implementation for the conversion tests)
and their perplexity with Megatron's window convention, computed by ``transformers``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

__all__ = ["tiny_qwen3_moe", "tiny_llama", "hf_perplexity", "random_tokens"]

VOCAB = 300  # not a multiple of 128: exercises Megatron's vocabulary padding


def tiny_qwen3_moe(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                   max_shard_size: str | None = "200KB", **overrides):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
                            rope_theta=10000.0, initializer_range=0.1, **overrides)
    model = Qwen3MoeForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def tiny_llama(path: Path, seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, initializer_range=0.1, **overrides)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    return model


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int64)


@torch.no_grad()
def hf_perplexity(model, tokens: np.ndarray, seq_length: int) -> float:
    """exp(mean NLL) over windows [kL, kL+L] (inputs the first L, targets the last L)."""
    t = torch.as_tensor(tokens)
    n = (t.numel() - 1) // seq_length
    x = t[:n * seq_length].reshape(n, seq_length)
    y = t[1:n * seq_length + 1].reshape(n, seq_length)
    logits = model(input_ids=x).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return math.exp(float(nll))
