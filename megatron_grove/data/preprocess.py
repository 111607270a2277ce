"""Raw text -> a Megatron indexed dataset, at corpus scale.

Documents come from ``.jsonl`` files (one JSON object per line, its text under a chosen key)
and plain-text files (any other name: one document per file), in the order given. Each document
is tokenised and followed by the tokenizer's end-of-document token; empty documents are skipped
(and counted). The input is read in chunks of about :data:`CHUNK_BYTES`, which ``workers``
processes tokenise while the main process writes the results in input order, so the output is
the same for any number of workers. The dataset is written atomically
(:func:`megatron_grove.data.write_indexed_dataset`): on any refusal (:class:`InputError`: a
missing, unreadable or non-UTF-8 file, a bad JSON line, a record without the key, no document at
all) nothing is left behind.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy
from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_grove.data.datasets import EmptyDatasetError, write_indexed_dataset
from megatron_grove.data.tokenizer import JsonTokenizer, load_tokenizer

__all__ = ["InputError", "CHUNK_BYTES", "PreprocessResult", "preprocess"]

CHUNK_BYTES = 1 << 20  # input bytes per unit of work handed to a worker


class InputError(ValueError):
    """A problem with the input files, reported as one line without a traceback."""


@dataclass(frozen=True)
class _Item:
    """One raw document: a JSONL line (``line`` >= 1) or a whole plain-text file (``line`` 0)."""

    path: str
    line: int
    raw: bytes


@dataclass(frozen=True)
class _Chunk:
    """Raw documents and the input bytes they were read from (blank lines included)."""

    items: list[_Item]
    input_bytes: int


@dataclass
class _Encoded:
    """A chunk's documents as token ids (each ending in the end-of-document token), or the
    first problem found in it."""

    documents: list[numpy.ndarray]
    skipped_empty: int
    input_bytes: int
    error: Optional[str] = None


def _where(item: _Item) -> str:
    return f"{item.path}:{item.line}" if item.line else item.path


def _text(item: _Item, json_key: str) -> str:
    """The document text of ``item``; InputError naming the file (and line) if there is none."""
    try:
        text = item.raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{_where(item)}: not UTF-8 text (byte {item.raw[err.start]:#04x} at "
                         f"offset {err.start})") from None
    if not item.line:
        return text
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{_where(item)}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict) or json_key not in record:
        raise InputError(f"{_where(item)}: no key {json_key!r}")
    if not isinstance(record[json_key], str):
        raise InputError(f"{_where(item)}: {json_key!r} is not a string")
    return record[json_key]


def _encode(chunk: _Chunk, tokenizer: JsonTokenizer, json_key: str) -> _Encoded:
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    out = _Encoded(documents=[], skipped_empty=0, input_bytes=chunk.input_bytes)
    for item in chunk.items:
        try:
            text = _text(item, json_key)
        except InputError as err:
            out.error = str(err)
            return out
        if not text:
            out.skipped_empty += 1
            continue
        out.documents.append(numpy.asarray(tokenizer.encode(text) + [tokenizer.eod], dtype=dtype))
    return out


_worker_state: dict = {}


def _init_worker(tokenizer_path: Optional[str], json_key: str) -> None:
    _worker_state.update(tokenizer=load_tokenizer(tokenizer_path), json_key=json_key)


def _encode_in_worker(chunk: _Chunk) -> _Encoded:
    return _encode(chunk, _worker_state["tokenizer"], _worker_state["json_key"])


def _check_inputs(files: list[str]) -> None:
    if not files:
        raise InputError("no input files")
    for path in files:
        if not os.path.exists(path):
            raise InputError(f"input file not found: {path}")
        if not os.path.isfile(path):
            raise InputError(f"{path}: not a file")
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as err:
            raise InputError(f"{path}: cannot be read ({err.strerror})") from None


def _chunks(files: list[str]) -> Iterator[_Chunk]:
    """The input as chunks of about CHUNK_BYTES, in order (blank JSONL lines dropped)."""
    items: list[_Item] = []
    size = 0
    for path in files:
        with open(path, "rb") as f:
            if path.endswith(".jsonl"):
                lines: Iterator[tuple[int, bytes]] = enumerate(f, 1)
            else:
                lines = iter([(0, f.read())])
            for number, line in lines:
                size += len(line)
                if line.strip() or not number:
                    items.append(_Item(path, number, line.rstrip(b"\r\n") if number else line))
                if size >= CHUNK_BYTES:
                    yield _Chunk(items, size)
                    items, size = [], 0
    if items or size:
        yield _Chunk(items, size)


def _encoded_chunks(files: list[str], tokenizer_path: Optional[str], json_key: str,
                    workers: int) -> Iterator[_Encoded]:
    """:func:`_chunks` tokenised, in input order; with ``workers`` > 1, by a process pool with
    at most 2 chunks per worker in flight (bounded memory on any corpus size)."""
    if workers == 1:
        tokenizer = load_tokenizer(tokenizer_path)
        for chunk in _chunks(files):
            yield _encode(chunk, tokenizer, json_key)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(
            workers, initializer=_init_worker, initargs=(tokenizer_path, json_key)) as pool:
        pending: deque = deque()
        for chunk in _chunks(files):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class PreprocessResult:
    """What :func:`preprocess` wrote and how fast."""

    documents: int
    tokens: int  # end-of-document tokens included
    skipped_empty: int  # empty documents left out
    input_bytes: int
    seconds: float
    workers: int

    @property
    def mb_per_s(self) -> float:
        """Input megabytes (1e6 bytes) per second."""
        return self.input_bytes / 1e6 / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def preprocess(files: list[str], output_prefix: str, json_key: str = "text",
               tokenizer: Optional[str] = None, workers: int = 1,
               progress: bool = True) -> PreprocessResult:
    """Tokenise ``files`` into ``output_prefix.{bin,idx}`` (written atomically; nothing is left
    behind on an :class:`InputError`).

    Args:
        files: ``.jsonl`` files (one JSON object per line) and plain-text files (one document
            each), read in this order.
        output_prefix: where to write ``.bin`` and ``.idx``.
        json_key: the key of a JSONL record's text.
        tokenizer: a ``tokenizer.json`` or its folder (None: the shipped one).
        workers: tokenising processes (1: in this process).
        progress: show a tqdm bar over the input bytes.
    """
    if workers < 1:
        raise InputError(f"--workers {workers}: must be >= 1")
    _check_inputs(files)
    vocab_size = load_tokenizer(tokenizer).vocab_size  # a bad tokenizer fails before any work
    total_bytes = sum(os.path.getsize(path) for path in files)
    began = time.perf_counter()
    counts = {"tokens": 0, "skipped_empty": 0}
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
              disable=not progress, dynamic_ncols=True) as bar:

        def documents() -> Iterator[numpy.ndarray]:
            for encoded in _encoded_chunks(files, tokenizer, json_key, workers):
                if encoded.error is not None:
                    raise InputError(encoded.error)
                counts["skipped_empty"] += encoded.skipped_empty
                for ids in encoded.documents:
                    counts["tokens"] += len(ids)
                    yield ids
                bar.update(encoded.input_bytes)

        try:
            written = write_indexed_dataset(documents(), output_prefix, vocab_size)
        except EmptyDatasetError:
            raise InputError(f"no documents in {', '.join(files)} (empty input); nothing "
                             "written") from None
    return PreprocessResult(documents=written, tokens=counts["tokens"],
                            skipped_empty=counts["skipped_empty"], input_bytes=total_bytes,
                            seconds=time.perf_counter() - began, workers=workers)
