"""Tokenise text files into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx).

Inputs: ``.txt`` files (each file is one document) and ``.jsonl`` files (each line is a JSON
object and one document, its text under ``--json-key``). Every document is followed by the
tokenizer's end-of-document token.

Example::

    python tools/preprocess_data.py --input a.txt b.jsonl --output-prefix data/mycorpus
"""

from __future__ import annotations

import argparse
import sys

from megatron_grove.cli import fail
from megatron_grove.data.preprocess import InputError, preprocess


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter
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
        result = preprocess(args.input, args.output_prefix, args.json_key, args.tokenizer)
    except (InputError, OSError, ValueError) as err:
        return fail("preprocess_data.py", err)
    print(f"wrote {args.output_prefix}.{{bin,idx}}: {result.documents} documents, "
          f"{result.tokens} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
