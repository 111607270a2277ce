"""The run's data: training and validation datasets from the config, the micro-batches each step
reads, and the summary printed at start.

Sample ``i`` of a dataset is fixed by the config alone (Megatron's cached indices), and step
``s`` reads samples ``(s-1)*B .. s*B - 1`` (``B = train.global_batch_size``), so a resumed run
sees exactly the data an uninterrupted run would, blends included. Validation always reads the
first ``train.eval_iters * B`` samples of the validation dataset, so every validation (at any
step, in any run of the same config and data) scores the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from megatron_grove.config import GroveConfig
from megatron_grove.data import (
    Blend,
    build_gpt_datasets,
    check_sources,
    embedded_corpus_prefix,
    megatron_blend,
    samples_per_prefix,
)
from megatron_grove.data.tokenizer import JsonTokenizer

__all__ = ["TrainingData", "build_training_data", "resolve_sources", "micro_batches"]


def micro_batches(dataset, step: int, global_batch_size: int, micro_batch_size: int,
                  dp_rank: int, dp_size: int) -> list[dict[str, torch.Tensor]]:
    """The micro-batches of 1-based ``step`` for one data-parallel rank; each value ``[mbs, s]``
    (chat data adds ``attention_mask`` ``[mbs, 1, s, s]``, True = masked)."""
    per_rank = global_batch_size // dp_size
    first = (step - 1) * global_batch_size + dp_rank * per_rank
    out = []
    for start in range(first, first + per_rank, micro_batch_size):
        samples = [dataset[i] for i in range(start, start + micro_batch_size)]
        out.append({key: torch.stack([torch.as_tensor(s[key]) for s in samples])
                    for key in ("tokens", "labels", "loss_mask", "position_ids",
                                "attention_mask") if key in samples[0]})
    return out


@dataclass
class TrainingData:
    """``train`` and ``valid`` (None: no validation data) are Megatron datasets
    (:func:`megatron_grove.data.build_gpt_datasets`); ``summary``: lines describing them."""

    train: Any
    valid: Optional[Any]
    summary: list[str]


def resolve_sources(cfg: GroveConfig, tokenizer: JsonTokenizer
                    ) -> tuple[Blend, Optional[Blend], Optional[str]]:
    """``(train, valid, split)`` of the config, checked (:func:`check_sources`): the embedded
    corpus (tokenised once, with ``tokenizer``) when ``data.path`` is unset. Safe to call from
    every rank at once."""
    d = cfg.data
    train = (megatron_blend(d.path) if d.path is not None
             else ([embedded_corpus_prefix(tokenizer=tokenizer)], None))
    valid = megatron_blend(d.valid_path) if d.valid_path is not None else None
    check_sources(train, valid, d.resolved_split)
    return train, valid, d.resolved_split


def _source_lines(dataset: Any, num_samples: int, weights: Optional[list[float]],
                  names: list[str]) -> list[str]:
    """One line per prefix: samples drawn from it among the first ``num_samples``."""
    parts = dataset.datasets if len(names) > 1 else [dataset]
    lines = []
    for i, (count, part) in enumerate(zip(samples_per_prefix(dataset, num_samples), parts)):
        weight = f", weight {weights[i] / sum(weights):.3f}" if weights else ""
        lines.append(f"data:   {count:>9d} samples ({count / num_samples:6.1%}{weight}) from "
                     f"{names[i]} ({len(part.indices)} documents)")
    return lines


def build_training_data(cfg: GroveConfig, tokenizer: JsonTokenizer) -> TrainingData:
    """The run's training and validation datasets (every rank must call this; see
    :func:`megatron_grove.data.build_gpt_datasets`) and their summary."""
    t = cfg.train
    train_source, valid_source, split = resolve_sources(cfg, tokenizer)
    num_train = t.iters * t.global_batch_size
    num_valid = t.eval_iters * t.global_batch_size
    train, valid = build_gpt_datasets(train_source, valid_source, split, cfg.model.seq_length,
                                      (num_train, num_valid), t.seed, tokenizer,
                                      create_attention_mask=False)
    names = (train_source[0] if cfg.data.path is not None else ["the embedded corpus"])
    of = f"split {split}" if split else "all of data.path"
    summary = [f"data: training on {num_train} samples of {cfg.model.seq_length} tokens "
               f"({t.iters} steps x {t.global_batch_size}), {of}:",
               *_source_lines(train, num_train, train_source[1], names)]
    if valid is None or not t.eval_iters:
        reason = ("train.eval_iters=0" if not t.eval_iters else
                  f"data.split={split} holds out no validation part; set data.split or "
                  "data.valid_path for one")
        summary.append(f"data: no validation ({reason})")
    else:
        valid_names = valid_source[0] if valid_source else names
        valid_weights = valid_source[1] if valid_source else train_source[1]
        summary += [f"data: validation on {num_valid} samples ({t.eval_iters} batches x "
                    f"{t.global_batch_size}, the same at every validation), "
                    f"{f'split {split}' if split else 'data.valid_path'}:",
                    *_source_lines(valid, num_valid, valid_weights, valid_names)]
    return TrainingData(train=train, valid=valid if t.eval_iters else None, summary=summary)
