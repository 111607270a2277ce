"""Tokenise text files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

Inputs: ``.txt`` files (each file is one document) and ``.jsonl`` files (each line is a JSON
object and one document, its text under ``--json-key``). Every document is followed by the
tokenizer's end-of-document token.

Example::

    python tools/preprocess_data.py --input a.txt b.jsonl --output-prefix data/mycorpus
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator

import numpy
from megatron.core.datasets.indexed_dataset import IndexedDataset
from tqdm import tqdm

from megatron_grove.cli import fail
from megatron_grove.data import tokenize_to_indexed_dataset
from megatron_grove.tokenizer import load_tokenizer


class InputError(Exception):
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


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="FILE", help=".txt or .jsonl files"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="key of the text in .jsonl records")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json or its directory (default: shipped)"
    )
    args = parser.parse_args(argv)

    try:
        missing = [path for path in args.input if not os.path.isfile(path)]
        if missing:
            raise InputError(f"input file not found: {missing[0]}")
        tokenizer = load_tokenizer(args.tokenizer)
        documents = tqdm(iter_documents(args.input, args.json_key), desc="documents", unit="doc")
        tokenize_to_indexed_dataset(documents, args.output_prefix, tokenizer)
    except (InputError, OSError, ValueError) as err:
        return fail("preprocess_data.py", err)

    dataset = IndexedDataset(args.output_prefix)
    num_documents = len(dataset.document_indices) - 1
    num_tokens = int(numpy.sum(dataset.sequence_lengths, dtype=numpy.int64))
    print(f"wrote {args.output_prefix}.{{bin,idx}}: {num_documents} documents, {num_tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
