"""CMoE on SmolLM2-135M-Instruct: dense vs carved (training-free) perplexity on held-out text.

    python benchmarks/cmoe_smollm2.py --specs S1A1E4 S2A2E8 S3A3E8 S3A5E8 --out runs/cmoe_bench

For every spec it carves the model (construction time from its record) and measures perplexity
on Hamlet (the held-out play) in windows of --window tokens (window k covers tokens [kL, kL+L]:
inputs its first L, targets its last L, as tools/evaluate.py): the dense model through Hugging
Face transformers, the carved one through our Megatron model loaded from the checkpoint the
carving wrote. One JSON line per model is appended to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_grove.benchmarking.cmoe import (
    carve_and_measure,
    heldout_tokens,
    hf_perplexity,
    megatron_perplexity,
)
from megatron_grove.cmoe.gguf import smollm2_hf_dir
from megatron_grove.data import heldout_text_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmoe_smollm2.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="*", default=["S1A1E4", "S2A2E8", "S3A3E8"])
    parser.add_argument("--out", default="runs/cmoe_bench")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--text", default=heldout_text_path(),
                        help="held-out text file (default: the embedded Hamlet)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate only the first N windows (default: the whole text)")
    parser.add_argument("--dense", action="store_true", help="also measure the dense model")
    parser.add_argument("--checkpoints", nargs="*", default=[],
                        help="also measure these checkpoints of ours (e.g. fine-tuned ones)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = str(smollm2_hf_dir())
    tokens = heldout_tokens(hf_dir, args.text, args.window, args.max_windows)

    def report(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    if args.dense:
        result = hf_perplexity(hf_dir, tokens, args.window)
        report({"model": "dense", "ppl": result.ppl, "tokens": result.tokens})
    for spec in args.specs:
        report(carve_and_measure(hf_dir, spec, out, tokens, args.window))
    for checkpoint in args.checkpoints:
        result = megatron_perplexity(checkpoint, tokens, args.window)
        report({"model": checkpoint, "ppl": result.ppl, "tokens": result.tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
