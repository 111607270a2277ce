"""Tokenised corpora in Megatron's indexed format, and the embedded corpus.

An indexed dataset is a ``PREFIX.bin`` (token ids back to back, uint16 for vocabularies under
65500 ids, else int32, as Megatron's ``DType.optimal_dtype`` picks) and a ``PREFIX.idx``
(sequence lengths and document boundaries). Each document is one sequence ending in the
tokenizer's end-of-document token. Megatron's ``GPTDataset`` (:mod:`.blends`) cuts the
concatenated, per-epoch shuffled documents into fixed-length samples.

Everything here runs on CPU, with or without ``torch.distributed`` initialised.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy
import torch
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


EMBEDDED_DOCUMENT_CHARS = 4000  # the embedded plays are cut into documents of about this size


def split_into_documents(text: str, min_chars: int = EMBEDDED_DOCUMENT_CHARS) -> list[str]:
    """``text`` cut after blank lines into documents of at least ``min_chars`` characters (the
    last one may be shorter); joined, they give back ``text``."""
    documents, start = [], 0
    for blank in re.finditer(r"\n[ \t]*\n", text):
        if blank.end() - start >= min_chars:
            documents.append(text[start:blank.end()])
            start = blank.end()
    if text[start:].strip() or not documents:
        documents.append(text[start:])
    else:
        documents[-1] += text[start:]
    return documents


def embedded_train_documents() -> list[str]:
    """The shipped training plays as documents (:func:`split_into_documents`), play by play in
    file-name order. Megatron's split string takes its validation part from the end of this
    list (the last scenes of The Tempest)."""
    return [document for path in embedded_train_files()
            for document in split_into_documents(Path(path).read_text(encoding="utf-8"))]


HELDOUT_TEXTS = ("hamlet", "othello")


def heldout_text_path(name: str = "hamlet") -> str:
    """Path of a held-out evaluation text (:data:`HELDOUT_TEXTS`; neither is in the training
    slice): Hamlet, the default, or Othello, the CMoE benchmark's second text."""
    if name not in HELDOUT_TEXTS:
        raise ValueError(f"held-out text {name!r}: allowed {', '.join(HELDOUT_TEXTS)}")
    return str(_corpus_dir() / "heldout" / f"{name}.txt")


class EmptyDatasetError(ValueError):
    """There were no documents to write."""


def write_indexed_dataset(documents: Iterable[Sequence[int] | numpy.ndarray], output_prefix: str,
                          vocab_size: int) -> int:
    """Write token-id documents into Megatron's indexed dataset ``output_prefix.{bin,idx}``.

    Each document is written as given (one sequence; callers append the end-of-document
    token), as uint16 below 65500 ids, else int32 (Megatron's ``DType.optimal_dtype``). Both
    files are written under temporary names and renamed into place (``.bin`` first, ``.idx``
    last), so a reader that finds the ``.idx`` finds a complete dataset, processes racing to
    write the same dataset are harmless, and a failure (or no document at all:
    :class:`EmptyDatasetError`) leaves nothing behind.

    Returns:
        The number of documents written.
    """
    return write_parallel_indexed_datasets(((ids,) for ids in documents), [output_prefix],
                                           [DType.optimal_dtype(vocab_size)])


def write_parallel_indexed_datasets(rows: Iterable[Sequence[Sequence[int] | numpy.ndarray]],
                                    output_prefixes: Sequence[str],
                                    dtypes: Sequence[type]) -> int:
    """Write several indexed datasets side by side, one document of each per row of ``rows``
    (e.g. token ids and their loss mask), as :func:`write_indexed_dataset` writes one: under
    temporary names, every ``.bin`` renamed into place first, then the ``.idx`` files in reverse
    order, ``output_prefixes[0]``'s last; on any failure nothing is left behind.

    Returns:
        The number of rows (documents of each dataset) written.
    """
    tmp_prefixes = [f"{prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex}" for prefix in output_prefixes]
    for prefix in output_prefixes:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    builders = [IndexedDatasetBuilder(get_bin_path(tmp), dtype=dtype)
                for tmp, dtype in zip(tmp_prefixes, dtypes)]
    count = 0
    try:
        for row in rows:
            for builder, ids, dtype in zip(builders, row, dtypes):
                builder.add_item(torch.from_numpy(numpy.asarray(ids, dtype=dtype)))
                builder.end_document()
            count += 1
        if not count:
            raise EmptyDatasetError(f"no documents to write to {output_prefixes[0]}")
        for builder, tmp in zip(builders, tmp_prefixes):
            builder.finalize(get_idx_path(tmp))
        for tmp, prefix in zip(tmp_prefixes, output_prefixes):
            os.replace(get_bin_path(tmp), get_bin_path(prefix))
        for tmp, prefix in reversed(list(zip(tmp_prefixes, output_prefixes))):
            os.replace(get_idx_path(tmp), get_idx_path(prefix))
    finally:
        for builder in builders:
            builder.data_file.close()
        for tmp in tmp_prefixes:
            for path in (get_bin_path(tmp), get_idx_path(tmp)):
                if os.path.exists(path):
                    os.remove(path)
    return count


def tokenize_to_indexed_dataset(
    texts: Iterable[str], output_prefix: str, tokenizer: JsonTokenizer
) -> int:
    """Tokenise documents into Megatron's indexed dataset ``output_prefix.{bin,idx}``
    (:func:`write_indexed_dataset`): each text becomes one document of
    ``len(tokenizer.encode(text)) + 1`` tokens, its ids followed by ``tokenizer.eod``.
    Returns the number of documents."""
    return write_indexed_dataset((tokenizer.encode(text) + [tokenizer.eod] for text in texts),
                                 output_prefix, tokenizer.vocab_size)


def _embedded_corpus_key(tokenizer: JsonTokenizer) -> str:
    """Hash of the shipped training texts, of how they are cut and of the tokenizer."""
    digest = hashlib.sha256(json.dumps(tokenizer.unique_identifiers).encode())
    digest.update(f"documents of {EMBEDDED_DOCUMENT_CHARS} chars".encode())
    for path in embedded_train_files():
        digest.update(os.path.basename(path).encode())
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def embedded_corpus_prefix(
    cache_dir: str | None = None, tokenizer: JsonTokenizer | None = None
) -> str:
    """Prefix of the shipped training plays tokenised as an indexed dataset (documents of
    :func:`embedded_train_documents`), built once.

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
        tokenize_to_indexed_dataset(embedded_train_documents(), prefix, tokenizer)
    return prefix
