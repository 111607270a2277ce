"""Tokenise text into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) for training.

Inputs, read in the order given: ``.jsonl`` files (each line a JSON object and one document,
its text under ``--json-key``) and plain-text files (any other name; each file is one
document). Every document is followed by the tokenizer's end-of-document token; empty
documents are skipped. ``--workers N`` processes tokenise in parallel (the output does not
depend on N); a progress bar runs over the input bytes, and the last line reports documents,
tokens, MB/s and tokens/s. Bad input (a missing, unreadable or non-UTF-8 file, a bad JSON line,
a record without the key, an empty input) stops with one line and exit code 2, and leaves no
output behind.

Example::

    python tools/preprocess_data.py --input web.jsonl books/*.txt --output-prefix data/mix \\
        --json-key text --workers 8

Train on it with ``data.path=data/mix``, or blend several with
``data.path=[[0.7,data/web],[0.3,data/books]]``.

Chat data (``--chat``, in one process): each JSONL line is a conversation, ``{"messages":
[{"role": "system"|"user"|"assistant", "content": ...}, ...]}`` or ``{"prompt": ...,
"response": ...}`` (+ ``"system"``), rendered by the tokenizer's chat template (its
``chat_template``; ChatML when it has none) and written with its per-token loss mask (1 on the
assistant's tokens, end of turn included) to PREFIX.loss_mask.{bin,idx}. A bad record (not JSON,
no assistant turn, unknown role, empty content) stops with one line naming file and line;
``--skip-bad`` leaves such records out and counts them. See docs/sft.md.

    python tools/preprocess_data.py --chat --input chat.jsonl --output-prefix data/chat \\
        --tokenizer checkpoints/my_model/hf
"""

from __future__ import annotations

import argparse
import sys

from megatron_grove.cli import fail
from megatron_grove.data.chat_preprocess import preprocess_chat
from megatron_grove.data.preprocess import InputError, preprocess


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--input", nargs="+", required=True, metavar="FILE",
        help=".jsonl files (one document per line) and plain-text files (one document each)"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="key of the text in .jsonl records")
    parser.add_argument(
        "--tokenizer", default=None, help="tokenizer.json or its directory (default: shipped)"
    )
    parser.add_argument("--workers", type=int, default=1,
                        help="tokenising processes (default 1: in this process)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--chat", action="store_true",
                        help="chat JSONL: conversations + per-token loss mask (docs/sft.md)")
    parser.add_argument("--skip-bad", action="store_true",
                        help="--chat: leave bad records out and count them, instead of stopping")
    args = parser.parse_args(argv)
    if args.chat:
        return _main_chat(args)
    if args.skip_bad:
        return fail("preprocess_data.py", "--skip-bad: applies to --chat input only")
    try:
        result = preprocess(args.input, args.output_prefix, args.json_key, args.tokenizer,
                            workers=args.workers, progress=not args.no_progress)
    except (InputError, OSError, ValueError) as err:
        return fail("preprocess_data.py", err)
    skipped = f" ({result.skipped_empty} empty skipped)" if result.skipped_empty else ""
    print(f"wrote {args.output_prefix}.{{bin,idx}}: {result.documents} documents{skipped}, "
          f"{result.tokens} tokens from {result.input_bytes / 1e6:.1f} MB in "
          f"{result.seconds:.1f} s: {result.mb_per_s:.2f} MB/s, {result.tokens_per_s:,.0f} "
          f"tokens/s with {result.workers} worker(s)")
    return 0


def _main_chat(args: argparse.Namespace) -> int:
    if args.workers != 1:
        return fail("preprocess_data.py", f"--workers {args.workers}: --chat runs in one process")
    try:
        result = preprocess_chat(args.input, args.output_prefix, args.tokenizer,
                                 skip_bad=args.skip_bad, progress=not args.no_progress)
    except (InputError, OSError, ValueError) as err:
        return fail("preprocess_data.py", err)
    for example in result.skipped_examples:
        print(f"skipped {example}", file=sys.stderr)
    skipped = f", {result.skipped_bad} bad records skipped" if result.skipped_bad else ""
    print(f"wrote {args.output_prefix}.{{bin,idx}} + .loss_mask.{{bin,idx}}: "
          f"{result.conversations} conversations{skipped}, {result.tokens} tokens, "
          f"{result.loss_tokens} loss tokens ({result.loss_tokens / result.tokens:.1%}), "
          f"template: {result.template_source}, in {result.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
