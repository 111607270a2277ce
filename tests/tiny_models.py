"""Tiny ``transformers`` peers (Llama, Qwen3-MoE) saved as HF folders, random model states of our
configs, and perplexity over Megatron's window convention on either side."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from processes import in_world

VOCAB = 300  # not a multiple of 128: exercises Megatron's vocabulary padding


def tiny_qwen3_moe(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                   max_shard_size: str | None = "200KB", **overrides):
    """A random ``Qwen3MoeForCausalLM`` (2 layers, 8 experts top-2) saved to ``path``."""
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


def tiny_llama(path: Path, seed: int = 0, tokenizer_file: Optional[str] = None, **overrides):
    """A random ``LlamaForCausalLM`` (2 layers, hidden 64) saved to ``path``; with
    ``tokenizer_file`` (a ``tokenizer.json``) its tokenizer is saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True, initializer_range=0.1),
                            **overrides})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    if tokenizer_file is not None:
        PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="<|endoftext|>",
                                pad_token="<|pad|>").save_pretrained(path)
    return model


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int64)


@torch.no_grad()
def hf_perplexity(model, tokens: np.ndarray, seq_length: int) -> float:
    """exp(mean NLL) computed by ``transformers``, over windows [kL, kL+L] (inputs the first
    L, targets the last L)."""
    t = torch.as_tensor(tokens)
    n = (t.numel() - 1) // seq_length
    x = t[:n * seq_length].reshape(n, seq_length)
    y = t[1:n * seq_length + 1].reshape(n, seq_length)
    logits = model(input_ids=x).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return math.exp(float(nll))


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _our_perplexity(cfg, state, tokens, seq_length: int) -> float:
    from megatron_grove.checkpointing.model_io import build_model, load_state_into_model
    from megatron_grove.evaluation import perplexity

    model = build_model(cfg)
    load_state_into_model(model, cfg, state)
    return perplexity(model, tokens, seq_length, cfg.model.vocab_size, progress=False).ppl


def our_perplexity(cfg, state, tokens, seq_length: int = 32) -> float:
    """Perplexity of (config, global state dict) with our Megatron model, in a forked world."""
    return in_world(_our_perplexity, cfg, state, tokens, seq_length)


def random_model_state_here(cfg, seed: int = 0, bias_std: float = 0.2
                            ) -> dict[str, torch.Tensor]:
    """:func:`random_model_state` inside an existing (forked) world."""
    from megatron_grove.checkpointing.model_io import build_model, model_state_dict

    torch.manual_seed(seed)
    model = build_model(cfg, initialize=True)
    state = model_state_dict(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(state):
        if name.endswith("expert_bias"):
            state[name] = torch.randn(state[name].shape, generator=gen) * bias_std
    return state


def random_model_state(cfg, seed: int = 0, bias_std: float = 0.2) -> dict[str, torch.Tensor]:
    """The global state dict of our model for ``cfg`` at random initial weights (built in a
    forked world), every expert bias drawn from ``N(0, bias_std^2)``."""
    return in_world(random_model_state_here, cfg, seed, bias_std)
