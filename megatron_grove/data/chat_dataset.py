"""Megatron's ``GPTDataset`` that also serves chat data: whole conversations packed into samples.

:class:`PackedChatDataset` is what :func:`megatron_grove.data.build_gpt_datasets` builds every
prefix of a blend with once any of them is chat data (a ``PREFIX.loss_mask`` beside it,
:func:`~megatron_grove.data.chat.is_chat_prefix`). A plain prefix is served exactly as
``GPTDataset`` serves it (documents concatenated and cut every ``seq_length`` tokens, loss on
every token). A chat prefix is served packed:

* per epoch, its conversations (documents of the split, shuffled with ``random_seed`` and the
  epoch number) are taken in order and packed greedily into samples of ``seq_length + 1`` tokens
  (inputs and the shifted labels), a conversation going into the current sample when it fits
  whole and starting a new sample otherwise, so no conversation is split between two samples;
  the rest of a sample is padding (loss mask 0). A conversation longer than that gets samples of
  its own, cut every ``seq_length`` tokens as ``GPTDataset`` cuts documents;
* ``loss_mask`` is the stored mask of each label token (1 on the assistant's tokens, 0 on the
  prompt, the template's markup, the end-of-document token and the padding);
* ``attention_mask`` [1, S, S] (True = masked) is block-diagonal causal: a token attends only to
  earlier tokens of its own conversation; ``position_ids`` restart at 0 for each conversation.

The packing is computed on every rank from the document lengths and the seed (no cache), so
every rank sees the same samples.
"""

from __future__ import annotations

from typing import Optional

import numpy
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.utils import Split

from megatron_grove.data.chat import is_chat_prefix, loss_mask_prefix

__all__ = ["PackedChatDataset", "pack_conversations"]


def pack_conversations(lengths: numpy.ndarray, capacity: int) -> list[list[tuple[int, int, int]]]:
    """Greedy in-order packing of documents of ``lengths`` tokens into samples of at most
    ``capacity`` tokens. Returns the samples, each a list of ``(document position, offset,
    length)`` pieces: whole documents, except that a document longer than ``capacity`` is cut
    into pieces of ``capacity`` tokens starting every ``capacity - 1`` tokens (each label is
    predicted once), each piece a sample of its own."""
    samples: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    used = 0
    for position, length in enumerate(int(n) for n in lengths):
        if length > capacity:
            if current:
                samples.append(current)
                current, used = [], 0
            for offset in range(0, length - 1, capacity - 1):
                samples.append([(position, offset, min(capacity, length - offset))])
            continue
        if used + length > capacity:
            samples.append(current)
            current, used = [], 0
        current.append((position, 0, length))
        used += length
    if current:
        samples.append(current)
    return samples


class PackedChatDataset(GPTDataset):
    """``GPTDataset`` for plain prefixes; packed conversations with their loss mask for chat
    prefixes (module docstring). Same constructor as ``GPTDataset``."""

    def __init__(self, indexed_dataset: IndexedDataset, dataset_path: Optional[str],
                 indexed_indices: numpy.ndarray, num_samples: Optional[int], index_split: Split,
                 config: GPTDatasetConfig) -> None:
        self.loss_masks: Optional[IndexedDataset] = None
        if dataset_path is not None and is_chat_prefix(dataset_path):
            self.loss_masks = IndexedDataset(loss_mask_prefix(dataset_path))
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                         config)

    def _build_document_sample_shuffle_indices(self):
        if self.loss_masks is None:
            return super()._build_document_sample_shuffle_indices()
        lengths = self.dataset.sequence_lengths
        capacity = self.config.sequence_length + 1
        self.samples: list[list[tuple[int, int, int]]] = []
        epoch = 0
        while True:  # whole epochs until there are num_samples samples (one when None)
            order = numpy.random.RandomState(self.config.random_seed + epoch).permutation(
                self.indices)
            self.samples += [[(int(order[p]), offset, n) for p, offset, n in sample]
                             for sample in pack_conversations(lengths[order], capacity)]
            epoch += 1
            if self.num_samples is None or len(self.samples) >= self.num_samples:
                break
        return None, None, None

    def __len__(self) -> int:
        if self.loss_masks is None:
            return super().__len__()
        return len(self.samples)

    def __getitem__(self, idx: Optional[int]) -> dict[str, torch.Tensor]:
        if self.loss_masks is None:
            return super().__getitem__(idx)
        pieces = self.samples[0 if idx is None else idx]
        size = self.config.sequence_length + 1
        text = numpy.full(size, self._pad_token_id if self._pad_token_id >= 0 else 0,
                          dtype=numpy.int64)
        mask = numpy.zeros(size, dtype=numpy.float32)
        segment = numpy.full(size, len(pieces), dtype=numpy.int64)  # padding: its own segment
        start = 0
        for number, (document, offset, length) in enumerate(pieces):
            text[start:start + length] = self.dataset.get(document, offset, length)
            mask[start:start + length] = self.loss_masks.get(document, offset, length)
            segment[start:start + length] = number
            start += length
        tokens = torch.from_numpy(text[:-1].copy())
        labels = torch.from_numpy(text[1:].copy())
        same = torch.from_numpy(segment[:-1] == segment[1:])
        loss_mask = torch.from_numpy(mask[1:].copy()) * same  # never across a boundary
        if idx is None:
            loss_mask.zero_()
        seg = torch.from_numpy(segment[:-1])
        seq = self.config.sequence_length
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        attention_mask = ~(causal & (seg[:, None] == seg[None, :]))
        first = torch.from_numpy(numpy.searchsorted(segment[:-1], segment[:-1], side="left"))
        position_ids = torch.arange(seq) - first
        return {"tokens": tokens, "labels": labels, "attention_mask": attention_mask[None],
                "loss_mask": loss_mask, "position_ids": position_ids}
