"""Perplexity of a model on a 1-D token stream, with Megatron's sample convention.

Window ``k`` covers tokens ``[kL, kL + L]`` (``L + 1`` tokens): its first ``L`` are the
inputs, its last ``L`` the targets; windows that do not fit are dropped. PPL =
``exp(mean NLL over all targets)``, computed in fp32 over the true vocabulary (the padded
vocabulary rows Megatron adds are ignored).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from megatron_grove.config import GroveConfig
from megatron_grove.checkpointing import checkpoint_tokenizer
from megatron_grove.checkpointing.model_io import (
    build_model,
    load_megatron_model,
    load_state_into_model,
)
from megatron_grove.hf_conversion import is_hf_checkpoint, load_hf_checkpoint
from megatron_grove.megatron_config import TORCH_DTYPES
from megatron_grove.model import gpt_logits

__all__ = ["token_windows", "PerplexityResult", "perplexity", "window_perplexity",
           "EvaluatedModel", "load_for_evaluation"]


def token_windows(tokens: np.ndarray | torch.Tensor, seq_length: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D ``tokens`` -> ``(inputs, targets)``, each ``[N, L]`` int64, ``N = (n - 1) // L``."""
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.int64).reshape(-1)
    n = (tokens.numel() - 1) // seq_length
    if n < 1:
        raise ValueError(f"{tokens.numel()} tokens do not fill one window of seq_length "
                         f"{seq_length} + 1; use a shorter --seq-length or more tokens")
    inputs = tokens[:n * seq_length].reshape(n, seq_length)
    targets = tokens[1:n * seq_length + 1].reshape(n, seq_length)
    return inputs, targets


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per target token (nats)
    tokens: int  # target tokens scored
    windows: int


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokens: np.ndarray | torch.Tensor, seq_length: int,
               vocab_size: int, batch_size: int = 4, device: torch.device | str = "cpu",
               progress: bool = True) -> PerplexityResult:
    """Score ``tokens`` (1-D ids < ``vocab_size``) with our ``GPTModel`` (logits
    ``[b, L, V_padded]`` for inputs ``[b, L]``)."""
    inputs, targets = token_windows(tokens, seq_length)
    low, high = int(min(inputs.min(), targets.min())), int(max(inputs.max(), targets.max()))
    if low < 0 or high >= vocab_size:
        raise ValueError(f"token id {low if low < 0 else high} is outside the model's "
                         f"vocabulary of {vocab_size} (ids 0..{vocab_size - 1})")
    model.eval()
    total, count = 0.0, 0
    batches = range(0, inputs.shape[0], batch_size)
    for start in tqdm(batches, desc="evaluate", unit="batch", disable=not progress):
        x = inputs[start:start + batch_size].to(device)
        y = targets[start:start + batch_size].to(device)
        logits = gpt_logits(model, x, vocab_size)
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), y.reshape(-1),
                                                reduction="sum")
        total += float(nll)
        count += y.numel()
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=count, windows=inputs.shape[0])


@torch.no_grad()
def window_perplexity(logits_of: Callable[[torch.Tensor], torch.Tensor],
                      tokens: np.ndarray | torch.Tensor, seq_length: int,
                      progress: bool = False) -> PerplexityResult:
    """The same windows and PPL for any causal LM given as ``logits_of(ids [1, L]) ->
    logits [1, L, V]`` (e.g. a ``transformers`` model: ``lambda ids: model(ids).logits``)."""
    inputs, targets = token_windows(tokens, seq_length)
    total = 0.0
    for x, y in tqdm(list(zip(inputs, targets)), desc="evaluate", unit="window",
                     disable=not progress):
        logits = logits_of(x[None]).float()[0]
        total += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    count = targets.numel()
    return PerplexityResult(ppl=math.exp(total / count), nll=total / count, tokens=count,
                            windows=inputs.shape[0])


@dataclass
class EvaluatedModel:
    """A checkpoint loaded for evaluation: ``format`` ``"hf"`` or ``"megatron"``, its run config,
    our ``GPTModel`` on the device, and its tokenizer folder (None when it carries none)."""

    format: str
    config: GroveConfig
    model: torch.nn.Module
    tokenizer_dir: Optional[str]


def load_for_evaluation(path: str | Path, dtype: Optional[str] = "fp32",
                        device: torch.device | str = "cpu") -> EvaluatedModel:
    """Our model of the checkpoint at ``path``, auto-detected: a Hugging Face folder
    (config.json + safetensors) or a Megatron checkpoint (root or ``iter_*`` folder). ``dtype``:
    ``fp32``/``bf16``, or None for the weights' own. Call inside a (one-process) world."""
    path = Path(path)
    if is_hf_checkpoint(path):
        cfg, state = load_hf_checkpoint(path)
        model = build_model(cfg, dtype=TORCH_DTYPES[dtype or cfg.runtime.dtype])
        load_state_into_model(model, cfg, state)
        tokenizer_dir = str(path) if (path / "tokenizer.json").is_file() else None
        return EvaluatedModel("hf", cfg, model.to(device), tokenizer_dir)
    cfg, model = load_megatron_model(path, dtype=None if dtype is None else TORCH_DTYPES[dtype],
                                     device=device)
    return EvaluatedModel("megatron", cfg, model, checkpoint_tokenizer(path))
