"""Write the small chat set about the embedded plays (megatron_grove/data/play_chat.py) as JSONL.

    python tools/build_play_chat.py --output-dir data/play_chat [--per-play 400] [--seed 0]

writes OUTPUT_DIR/train.jsonl and OUTPUT_DIR/valid.jsonl (one {"messages": [...]} per line):
questions "who speaks the line ...?" and "what line comes after ...?" about the four training
plays, answered from the text; every 10th speech of a play is asked about in validation only.
Tokenise them with tools/preprocess_data.py --chat (docs/sft.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.cli import fail
    from megatron_grove.data.play_chat import play_chat_records

    parser = argparse.ArgumentParser(prog="build_play_chat.py", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="writes train.jsonl and valid.jsonl")
    parser.add_argument("--per-play", type=int, default=400, help="conversations per play")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.per_play < 1:
        return fail("build_play_chat.py", f"--per-play {args.per_play}: must be >= 1")
    train, valid = play_chat_records(seed=args.seed, per_play=args.per_play)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("valid", valid)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    print(f"wrote {out}/train.jsonl ({len(train)} conversations) and {out}/valid.jsonl "
          f"({len(valid)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
