"""CMoE on SmolLM2-135M-Instruct: dense vs carved (training-free) perplexity on held-out texts.

    python benchmarks/cmoe_smollm2.py --specs S3A3E8 S2A2E8 S1A3E8 --routers linear paper \
        --oracle --dense --max-windows 20 --out runs/cmoe_bench

For every spec and router it carves the model from its .gguf (the carving record's phase
timings go with the results) and measures perplexity on each --texts (Hamlet and Othello, the
embedded held-out plays) in windows of --window tokens (window k covers tokens [kL, kL+L]:
inputs its first L, targets its last L, as tools/evaluate.py): the dense model through Hugging
Face transformers, the carved one through its HF-style export in the same transformers model
(each FFN replaced by the exported experts and router; with --megatron also through our
Megatron model loaded from the checkpoint the carving wrote), and with --oracle the
activation-routing oracle on the first router's carving (a reference, not a servable model:
every expert computed, the A of largest activation mass kept). One JSON line per (model, text,
way) is appended to OUT/results.jsonl.
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
from megatron_grove.hf_conversion.gguf import smollm2_gguf_path, smollm2_hf_dir
from megatron_grove.data import heldout_text_path
from megatron_grove.data.datasets import HELDOUT_TEXTS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cmoe_smollm2.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="*", default=["S3A3E8", "S2A2E8", "S1A3E8"])
    parser.add_argument("--routers", nargs="*", default=["linear", "paper"],
                        choices=["linear", "paper"], help="training-free routers to carve with")
    parser.add_argument("--oracle", action="store_true",
                        help="also measure the activation-routing oracle (reference)")
    parser.add_argument("--texts", nargs="*", default=list(HELDOUT_TEXTS),
                        choices=list(HELDOUT_TEXTS), help="embedded held-out texts")
    parser.add_argument("--out", default="runs/cmoe_bench")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate only the first N windows of each text (default: all)")
    parser.add_argument("--dense", action="store_true", help="also measure the dense model")
    parser.add_argument("--megatron", action="store_true",
                        help="also measure each carving through our Megatron model of its "
                             "checkpoint (slower on CPU; the same function as the export)")
    parser.add_argument("--checkpoints", nargs="*", default=[],
                        help="also measure these checkpoints of ours (e.g. fine-tuned ones)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = str(smollm2_hf_dir())
    texts = {name: heldout_tokens(hf_dir, heldout_text_path(name), args.window, args.max_windows)
             for name in args.texts}

    def report(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    if args.dense:
        for name, tokens in texts.items():
            result = hf_perplexity(hf_dir, tokens, args.window)
            report({"model": "dense", "text": name, "ppl": result.ppl, "tokens": result.tokens})
    for spec in args.specs:
        for i, router in enumerate(args.routers):
            for record in carve_and_measure(str(smollm2_gguf_path()), spec, router, out, texts,
                                            args.window, args.calibration_tokens,
                                            oracle=args.oracle and i == 0,
                                            megatron=args.megatron):
                report(record)
    for checkpoint in args.checkpoints:
        for name, result in megatron_perplexity(checkpoint, texts, args.window).items():
            report({"model": checkpoint, "text": name, "ppl": result.ppl,
                    "tokens": result.tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
