"""Training and validation datasets from Megatron's blends and split strings.

A *data source* (``data.path``, ``data.valid_path``) is one indexed-dataset prefix or a weighted
blend ``[[weight, prefix], ...]``. Megatron's ``BlendedMegatronDatasetBuilder`` turns it into one
``GPTDataset`` per prefix and, for a blend, a ``BlendedDataset`` over them whose sample ``i``
comes from the prefix furthest below its share ``w_p * (i + 1)`` (Megatron's greedy blending
rule): after any ``n`` samples, prefix ``p`` has given ``n * w_p`` of them to within one.

Validation data comes one of Megatron's two ways:

* **split** (``blend`` + ``split``): each prefix's documents, in their stored order, are cut
  into train / validation / test parts by the shares of a split string such as ``"98,2,0"``;
* **separate validation data** (``blend_per_split``): the training source is used whole and
  the validation source is another prefix or blend.

Chat data (a prefix with a ``PREFIX.loss_mask`` beside it, written by
``tools/preprocess_data.py --chat``) is served packed, with its loss mask and per-conversation
attention masks, by :class:`~megatron_grove.data.chat_dataset.PackedChatDataset`, which then
serves every prefix of the blend (the plain ones exactly as ``GPTDataset`` does).

Everything here runs on CPU, with or without ``torch.distributed`` initialised; with it, every
rank must call :func:`build_gpt_datasets` (rank 0 builds the index caches first, the others
load them), and the cache must be one all ranks see.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_grove.config import SPLIT_PARTS, ConfigError, split_shares
from megatron_grove.data.chat import is_chat_prefix, loss_mask_prefix
from megatron_grove.data.chat_dataset import PackedChatDataset
from megatron_grove.data.datasets import cache_root
from megatron_grove.data.integrity import indexed_dataset_problem
from megatron_grove.data.tokenizer import JsonTokenizer

__all__ = ["Blend", "megatron_blend", "check_sources", "build_gpt_datasets", "samples_per_prefix",
           "has_chat_data"]

Blend = tuple[list[str], Optional[list[float]]]
"""Megatron's blend: prefixes and their weights (None for a single prefix)."""


def megatron_blend(source: str | list) -> Blend:
    """A config data source (a prefix, or ``[[weight, prefix], ...]``) as Megatron's blend."""
    if isinstance(source, str):
        return [source], None
    if len(source) == 1:
        return [source[0][1]], None
    return [prefix for _, prefix in source], [float(weight) for weight, _ in source]


def _split_documents(num_documents: int, split: str) -> list[Optional[range]]:
    """Megatron's cut of ``num_documents`` documents into the parts of ``split`` (None for a
    part of share 0), computed as ``BlendedMegatronDatasetBuilder`` does."""
    matrix = convert_split_vector_to_split_matrix(split_shares(split))
    return [None if bookends is None else
            range(int(round(bookends[0] * num_documents)), int(round(bookends[1] * num_documents)))
            for bookends in matrix]


def _same_documents(prefix: str, other: str) -> bool:
    """Whether the indexed datasets ``prefix`` and ``other`` hold documents of equal lengths."""
    a, b = IndexedDataset(prefix), IndexedDataset(other)  # kept alive: their arrays are mmaps
    return bool(numpy.array_equal(a.sequence_lengths, b.sequence_lengths))


def check_sources(train: Blend, valid: Optional[Blend], split: Optional[str]) -> None:
    """Refuse, with a one-line :class:`ConfigError`, data Megatron's builder cannot serve: a
    prefix whose ``.bin``/``.idx`` are missing or damaged (:func:`indexed_dataset_problem`), a
    chat prefix whose loss mask does not match its documents, or a split part of non-zero share
    that gets no document of some prefix (the builder would loop forever looking for its
    tokens)."""
    for key, blend in (("data.path", train), ("data.valid_path", valid)):
        for prefix in (blend[0] if blend is not None else []):
            if problem := indexed_dataset_problem(prefix):
                raise ConfigError(f"{key}={prefix}: {problem}")
            if is_chat_prefix(prefix) and not _same_documents(prefix, loss_mask_prefix(prefix)):
                raise ConfigError(f"{key}: {loss_mask_prefix(prefix)} does not match {prefix} "
                                  "(written by another run?); write both again with "
                                  "tools/preprocess_data.py --chat")
    if split is None:
        return
    for prefix in train[0]:
        documents = len(IndexedDataset(prefix))
        for part, cut in zip(SPLIT_PARTS, _split_documents(documents, split)):
            if cut is not None and len(cut) == 0:
                raise ConfigError(
                    f"data.split={split}: its {part} part gets none of the {documents} documents "
                    f"of {prefix}; raise that share, set it to 0, or give data.valid_path")


def has_chat_data(*sources: Optional[Blend]) -> bool:
    """Whether any prefix of the blends ``sources`` (None: none) is chat data."""
    return any(is_chat_prefix(prefix) for blend in sources if blend is not None
               for prefix in blend[0])


def build_gpt_datasets(train: Blend, valid: Optional[Blend], split: Optional[str],
                       seq_length: int, num_samples: tuple[int, int], seed: int,
                       tokenizer: JsonTokenizer, *, cache_dir: Optional[str] = None,
                       create_attention_mask: bool = True) -> tuple[Any, Optional[Any]]:
    """Megatron's training and validation datasets of ``train`` (+ ``valid``).

    Args:
        train: the training source; with ``split``, its train part.
        valid: a separate validation source (Megatron's ``blend_per_split``; ``split`` must
            then be None), or None.
        split: Megatron's split string (e.g. ``"98,2,0"``) cutting ``train``'s documents.
        seq_length: tokens per sample.
        num_samples: (training, validation) samples wanted; a dataset holds at least that
            many (whole epochs of its part, reshuffled per epoch with ``seed``).
        seed: seed of the document and sample shuffles.
        tokenizer: the tokenizer the datasets were written with (``eod``/``pad``).
        cache_dir: root of the index cache (``CACHE/gpt_dataset_indices``); see
            :func:`megatron_grove.data.cache_root`.
        create_attention_mask: include the ``[1, S, S]`` causal mask in each sample (always,
            when there is chat data).

    Returns:
        ``(train, valid)``: ``GPTDataset`` or, for a blend, ``BlendedDataset``; ``valid`` is
        None when there is no validation data (``split`` with a validation share of 0).
        Items are dicts of tensors, S = ``seq_length``: ``tokens`` [S] int64; ``labels`` [S]
        int64 (the next token); ``loss_mask`` [S] float32 (1.0, 0.0 on padding);
        ``position_ids`` [S] int64 (0..S-1); with ``create_attention_mask``,
        ``attention_mask`` [1, S, S] bool, True where attention is masked (above the
        diagonal); a ``BlendedDataset`` adds ``dataset_id`` (the prefix's index). With chat
        data (:func:`has_chat_data`) the datasets are ``PackedChatDataset``: chat samples carry
        their loss mask, a block-diagonal causal ``attention_mask`` and per-conversation
        ``position_ids``.
    """
    if (split is None) == (valid is None):
        raise ValueError("give either a split string or separate validation data")
    chat = has_chat_data(train, valid)
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=train if valid is None else None,
        blend_per_split=None if valid is None else [train, valid, None],
        split=split,
        path_to_cache=os.path.join(cache_root(cache_dir), "gpt_dataset_indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask or chat,
    )
    # every part gets a size (0 for the test part, never read): Megatron needs one for each
    # part of a weighted blend
    builder = BlendedMegatronDatasetBuilder(PackedChatDataset if chat else GPTDataset,
                                            [*num_samples, 0], lambda: True, config)
    train_dataset, valid_dataset, _ = builder.build()
    return train_dataset, valid_dataset


def samples_per_prefix(dataset: Any, num_samples: int) -> list[int]:
    """How many of the first ``num_samples`` samples of ``dataset`` come from each of its
    prefixes (``[num_samples]`` for a single-prefix dataset)."""
    if not isinstance(dataset, BlendedDataset):
        return [num_samples]
    counts = numpy.bincount(dataset.dataset_index[:num_samples], minlength=len(dataset.datasets))
    return [int(c) for c in counts]
