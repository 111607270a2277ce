"""Is an indexed dataset (``PREFIX.idx`` + ``PREFIX.bin``, Megatron's format) whole?

:func:`indexed_dataset_problem` reads the ``.idx`` itself (never through Megatron's reader,
whose asserts and numpy errors on a damaged file are tracebacks) and answers in one line:

* ``.idx``: at least its 34-byte header, Megatron's magic (a zero-filled file or a ``.bin``
  in its place fails here), version 1, a known token dtype, exactly the size its counts
  imply (a cut or truncated file fails here), sequence lengths >= 0, pointers that follow
  each other (``pointer[i+1] = pointer[i] + length[i] * dtype size``, as Megatron's builder
  writes them) and document bounds from 0 to the sequence count, non-decreasing;
* ``.bin``: exactly the bytes the index points to, not an index file itself (the two
  swapped), and no 4 KiB block of zeros at its start, its end or at 62 evenly spaced places
  (a zero-filled file, or the holes a failed copy leaves; 2048 consecutive id-0 tokens do
  not occur in tokenised text).

Index layout (little endian): ``MMIDIDX\\0\\0``, u64 version, u8 dtype code, u64 sequence
count S, u64 document count D; then S int32 lengths, S int64 byte pointers, D int64 document
bounds.
"""

from __future__ import annotations

import os
import struct

import numpy

__all__ = ["indexed_dataset_problem"]

_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequences, documents
_DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # Megatron's DType codes
_BLOCK = 4096
_SAMPLED_BLOCKS = 64


def _index_problem(idx: str) -> tuple[str | None, int]:
    """The ``.idx``'s problem (or None) and the ``.bin`` size it implies."""
    size = os.path.getsize(idx)
    if size < _HEADER.size:
        return (f"{idx} is truncated: {size} bytes, shorter than the {_HEADER.size}-byte "
                "header of an index"), 0
    with open(idx, "rb") as f:
        magic, version, code, sequences, documents = _HEADER.unpack(f.read(_HEADER.size))
    if magic != _MAGIC:
        what = ("all zero bytes (zero-filled)" if magic == bytes(len(magic)) else
                f"{magic!r}")
        return f"{idx} is not an index file: it starts with {what}, not {_MAGIC!r}", 0
    if version != 1 or code not in _DTYPE_SIZES:
        return f"{idx}: unknown index version {version} or token dtype code {code}", 0
    expected = _HEADER.size + sequences * (4 + 8) + documents * 8
    if size != expected:
        return (f"{idx} is {'truncated' if size < expected else 'too long'}: {size} bytes, its "
                f"header ({sequences} sequences, {documents} documents) says {expected}"), 0
    data = numpy.memmap(idx, mode="r", offset=_HEADER.size, dtype=numpy.uint8)
    lengths = numpy.frombuffer(data, numpy.int32, sequences)
    pointers = numpy.frombuffer(data, numpy.int64, sequences, offset=4 * sequences)
    bounds = numpy.frombuffer(data, numpy.int64, documents, offset=12 * sequences)
    item = _DTYPE_SIZES[code]
    if sequences and (lengths.min() < 0 or pointers[0] != 0 or numpy.any(
            pointers[1:] != pointers[:-1] + lengths[:-1].astype(numpy.int64) * item)):
        return f"{idx}: sequence lengths and pointers disagree; the index is damaged", 0
    if documents and (bounds[0] != 0 or bounds[-1] != sequences
                      or numpy.any(numpy.diff(bounds) < 0)):
        return f"{idx}: document bounds are not 0..{sequences}, ascending; the index is damaged", 0
    return None, (int(pointers[-1]) + int(lengths[-1]) * item) if sequences else 0


def _zero_block(path: str, size: int) -> int | None:
    """The offset of a sampled all-zero 4 KiB block of ``path``, or None."""
    blocks = max(1, size // _BLOCK)
    picks = sorted({int(i) for i in numpy.linspace(0, blocks - 1, min(blocks, _SAMPLED_BLOCKS))})
    with open(path, "rb") as f:
        for block in picks:
            f.seek(block * _BLOCK)
            chunk = f.read(_BLOCK)
            if len(chunk) == min(_BLOCK, size) and not any(chunk):
                return block * _BLOCK
    return None


def indexed_dataset_problem(prefix: str) -> str | None:
    """What is wrong with the indexed dataset ``prefix`` (one line, naming the file), or None.
    Missing files, an empty dataset and every check of the module docstring."""
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            return (f"{path} does not exist; give the prefix of a .bin/.idx pair written by "
                    "tools/preprocess_data.py")
    problem, expected = _index_problem(idx)
    if problem:
        return f"{problem}; preprocess it again"
    actual = os.path.getsize(bin_)
    if actual == 0:
        return f"the dataset holds no tokens ({bin_} is empty); preprocess a non-empty input"
    if expected == 0:
        return "the dataset holds no documents; preprocess a non-empty input"
    with open(bin_, "rb") as f:
        if f.read(len(_MAGIC)) == _MAGIC:
            return f"{bin_} is an index file, not token data: .idx and .bin swapped?"
    if actual != expected:
        return (f"{bin_} has {actual} bytes but its index points to {expected}; the .bin is "
                f"{'truncated' if actual < expected else 'too long'} or belongs to another "
                ".idx: preprocess it again")
    offset = _zero_block(bin_, actual)
    if offset is not None:
        return (f"{bin_} has 4096 zero bytes at offset {offset} (zero-filled: a failed copy?); "
                "copy or preprocess it again")
    return None
