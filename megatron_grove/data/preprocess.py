"""Raw text -> a Megatron indexed dataset: documents from ``.txt`` files (one document per file)
and ``.jsonl`` files (one JSON object per line, its text under a chosen key), each followed by
the tokenizer's end-of-document token (:func:`megatron_grove.data.tokenize_to_indexed_dataset`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tqdm import tqdm

from megatron_grove.data.datasets import tokenize_to_indexed_dataset
from megatron_grove.data.tokenizer import load_tokenizer

__all__ = ["InputError", "iter_documents", "PreprocessResult", "preprocess"]


class InputError(ValueError):
    """A problem with the input files, reported as one line without a traceback."""


def iter_documents(files: list[str], json_key: str) -> Iterator[str]:
    """Yield the documents of ``files`` in order: a whole ``.txt`` file or a ``.jsonl`` line."""
    for path in files:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for line_number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        message = f"{path}:{line_number}: invalid JSON ({err.msg})"
                        raise InputError(message) from None
                    if not isinstance(record, dict) or json_key not in record:
                        raise InputError(f"{path}:{line_number}: no key {json_key!r}")
                    yield str(record[json_key])
        else:
            with open(path, encoding="utf-8") as f:
                yield f.read()


@dataclass
class PreprocessResult:
    documents: int
    tokens: int


def preprocess(files: list[str], output_prefix: str, json_key: str = "text",
               tokenizer: str | None = None, progress: bool = True) -> PreprocessResult:
    """Tokenise ``files`` into ``output_prefix.{bin,idx}`` (written atomically); ``tokenizer``:
    a ``tokenizer.json`` or its folder (None: the shipped one)."""
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise InputError(f"input file not found: {missing[0]}")
    documents = tqdm(iter_documents(files, json_key), desc="documents", unit="doc",
                     disable=not progress)
    tokenize_to_indexed_dataset(documents, output_prefix, load_tokenizer(tokenizer))
    dataset = IndexedDataset(output_prefix)
    return PreprocessResult(documents=len(dataset.document_indices) - 1,
                            tokens=int(numpy.sum(dataset.sequence_lengths, dtype=numpy.int64)))
