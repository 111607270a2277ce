"""Training data: tokenised corpora in Megatron's indexed format, served by Megatron's GPTDataset.

An indexed dataset is a ``PREFIX.bin`` (token ids back to back, uint16 for vocabularies under
65500 ids, else int32, as Megatron's ``DType.optimal_dtype`` picks) and a ``PREFIX.idx``
(sequence lengths and document boundaries). Each document is one sequence ending in the
tokenizer's end-of-document token. ``GPTDataset`` cuts the concatenated, per-epoch shuffled
documents into fixed-length samples.

Everything here runs on CPU, with or without ``torch.distributed`` initialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from megatron_grove.data.tokenizer import JsonTokenizer, load_tokenizer

CACHE_ENV_VAR = "MEGATRON_GROVE_CACHE"


def cache_root(cache_dir: str | None = None) -> str:
    """``cache_dir``, else ``$MEGATRON_GROVE_CACHE``, else ``~/.cache/megatron_grove``."""
    default = os.path.expanduser("~/.cache/megatron_grove")
    return cache_dir or os.environ.get(CACHE_ENV_VAR) or default


def _corpus_dir() -> Path:
    return Path(__file__).parent / "assets" / "corpus"


def embedded_train_files() -> list[str]:
    """The shipped training texts (one play per file, sorted by name)."""
    return sorted(str(p) for p in (_corpus_dir() / "train").glob("*.txt"))


def heldout_text_path() -> str:
    """Path of the held-out evaluation text (Hamlet; not in the training slice)."""
    return str(_corpus_dir() / "heldout" / "hamlet.txt")


def tokenize_to_indexed_dataset(
    texts: Iterable[str], output_prefix: str, tokenizer: JsonTokenizer
) -> None:
    """Tokenise documents into Megatron's indexed dataset ``output_prefix.{bin,idx}``.

    Each text becomes one document of ``len(tokenizer.encode(text)) + 1`` tokens: its ids
    followed by ``tokenizer.eod``. Both files are written under temporary names and renamed
    into place (``.bin`` first, ``.idx`` last), so a reader that finds the ``.idx`` finds a
    complete dataset, and processes racing to write the same dataset are harmless.
    """
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    output_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(output_dir, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex}"
    builder = IndexedDatasetBuilder(get_bin_path(tmp_prefix), dtype=dtype)
    try:
        for text in texts:
            ids = tokenizer.encode(text) + [tokenizer.eod]
            builder.add_item(torch.tensor(ids, dtype=torch.int64))
            builder.end_document()
        builder.finalize(get_idx_path(tmp_prefix))
        os.replace(get_bin_path(tmp_prefix), get_bin_path(output_prefix))
        os.replace(get_idx_path(tmp_prefix), get_idx_path(output_prefix))
    finally:
        for path in (get_bin_path(tmp_prefix), get_idx_path(tmp_prefix)):
            if os.path.exists(path):
                os.remove(path)


def _embedded_corpus_key(tokenizer: JsonTokenizer) -> str:
    """Hash of the shipped training texts and of the tokenizer's identity."""
    digest = hashlib.sha256(json.dumps(tokenizer.unique_identifiers).encode())
    for path in embedded_train_files():
        digest.update(os.path.basename(path).encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def embedded_corpus_prefix(
    cache_dir: str | None = None, tokenizer: JsonTokenizer | None = None
) -> str:
    """Prefix of the shipped training slice tokenised as an indexed dataset, built once.

    Args:
        cache_dir: where to keep it; see :func:`cache_root` for the default.
        tokenizer: None for the shipped tokenizer.

    Returns:
        ``CACHE/corpus/shakespeare-HASH``, HASH covering the texts and the tokenizer; later
        calls (any process) reuse it. Safe to call from every rank at once.
    """
    tokenizer = tokenizer or load_tokenizer()
    name = f"shakespeare-{_embedded_corpus_key(tokenizer)}"
    prefix = os.path.join(cache_root(cache_dir), "corpus", name)
    if not IndexedDataset.exists(prefix):
        texts = (Path(path).read_text(encoding="utf-8") for path in embedded_train_files())
        tokenize_to_indexed_dataset(texts, prefix, tokenizer)
    return prefix


def build_gpt_dataset(
    prefix: str,
    seq_length: int,
    num_samples: int,
    seed: int,
    tokenizer: JsonTokenizer,
    *,
    cache_dir: str | None = None,
    create_attention_mask: bool = True,
) -> GPTDataset:
    """Megatron's ``GPTDataset`` over every document of the indexed dataset ``prefix``.

    Built with Megatron's ``BlendedMegatronDatasetBuilder`` (split "100,0,0"), so it follows
    Megatron's protocol when ``torch.distributed`` is initialised: rank 0 builds and saves the
    document/sample/shuffle indices, all ranks barrier, the others load them. Every rank must
    then call this, and the cache must be one all ranks see (a shared filesystem on
    multi-node runs, like Megatron-LM's ``--data-cache-path``): the other ranks only load.
    Without ``torch.distributed`` it just builds (or loads) them.

    Args:
        prefix: the ``.bin``/``.idx`` prefix.
        seq_length: tokens per sample.
        num_samples: samples wanted; the dataset holds at least that many (whole epochs of
            the corpus, reshuffled per epoch with ``seed``).
        seed: seed of the document and sample shuffles.
        tokenizer: the tokenizer the dataset was written with (for ``eod``/``pad``).
        cache_dir: root of the index cache (``CACHE/gpt_dataset_indices``); see
            :func:`cache_root`.
        create_attention_mask: include the ``[1, S, S]`` causal mask in each sample.

    Returns:
        A dataset whose items are dicts of tensors, S = ``seq_length``:
        ``tokens`` [S] int64; ``labels`` [S] int64 (``tokens`` shifted left by one: the
        next token); ``loss_mask`` [S] float32 (1.0, 0.0 on padding); ``position_ids`` [S]
        int64 (0..S-1); and if ``create_attention_mask``, ``attention_mask`` [1, S, S] bool,
        True where attention is *masked* (above the diagonal).
    """
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=([prefix], None),
        split="100,0,0",
        path_to_cache=os.path.join(cache_root(cache_dir), "gpt_dataset_indices"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=create_attention_mask,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, [num_samples, None, None], lambda: True, config
    )
    train, _, _ = builder.build()
    return train
