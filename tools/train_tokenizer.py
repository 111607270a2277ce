"""Train the byte-level BPE tokenizer shipped as ``megatron_grove/data/assets/tokenizer.json``.

Deterministic: the same input files (read in sorted order) and vocabulary size give a
byte-identical ``tokenizer.json``. Special tokens come first, so ``<|endoftext|>`` (the
end-of-document token) has id 0 and ``<|pad|>`` has id 1.

Example (regenerates the shipped asset)::

    python tools/train_tokenizer.py --input megatron_grove/data/assets/corpus/train \
        --vocab-size 4096 --output megatron_grove/data/assets/tokenizer.json
"""

from __future__ import annotations

import argparse
import os
import sys

from megatron_grove.cli import fail
from megatron_grove.data.tokenizer import collect_text_files, train_bpe


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input", nargs="+", required=True, help="text files or directories of *.txt files"
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="target vocabulary size")
    parser.add_argument("--output", required=True, help="path of the tokenizer.json to write")
    args = parser.parse_args(argv)

    try:
        files = collect_text_files(args.input)
    except FileNotFoundError as err:
        return fail("train_tokenizer.py", err)
    tokenizer = train_bpe(files, args.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(args.output)),
                       f".{os.path.basename(args.output)}.tmp")
    tokenizer.save(tmp, pretty=True)
    os.replace(tmp, args.output)  # an interrupted run leaves any previous file intact
    vocab_size = tokenizer.get_vocab_size()
    print(f"trained on {len(files)} files; vocab size {vocab_size} -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
