"""CMoE on SmolLM2-135M-Instruct: dense vs carved (training-free) perplexity on held-out text.

    python benchmarks/cmoe_smollm2.py --specs S1A1E4 S2A2E8 S3A3E8 S3A5E8 --out runs/cmoe_bench

For every spec it carves the model with tools/carve_cmoe.py (construction time from its
record) and measures perplexity on Hamlet (the held-out play; non-overlapping windows of
--window tokens, every token after the first of a window scored): the dense model through
Hugging Face transformers, the carved one through our Megatron model loaded from the
checkpoint the carving wrote. One JSON line per model is appended to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch


def hamlet_windows(tokenizer_dir: str, window: int, limit: int | None) -> torch.Tensor:
    from transformers import AutoTokenizer

    from megatron_grove.data import heldout_text_path

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(Path(heldout_text_path()).read_text(), add_special_tokens=False)["input_ids"]
    rows = len(ids) // window if limit is None else min(limit, len(ids) // window)
    return torch.tensor(ids[:rows * window]).reshape(rows, window)


def _ppl(logits_of, windows: torch.Tensor) -> tuple[float, int]:
    nll, count = 0.0, 0
    with torch.no_grad():
        for row in windows:
            logits = logits_of(row[None]).float()[0, :-1]
            nll += float(torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum"))
            count += row.numel() - 1
    return math.exp(nll / count), count


def hf_perplexity(hf_dir: str, windows: torch.Tensor) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return _ppl(lambda ids: model(input_ids=ids).logits, windows)


def megatron_perplexity(checkpoint: str, windows: torch.Tensor) -> tuple[float, int]:
    """Perplexity of one of our checkpoints, with the same windows as the dense model."""
    from megatron_grove.hf_conversion.megatron_io import load_megatron_model
    from megatron_grove.runtime import single_process_world
    from megatron_grove.training import causal_attention_mask

    with single_process_world():
        cfg, model = load_megatron_model(checkpoint)
        length = windows.shape[1]
        mask = causal_attention_mask(length, torch.device("cpu"))
        positions = torch.arange(length)[None]
        return _ppl(lambda ids: model.eval()(ids, positions, mask)[..., :cfg.model.vocab_size],
                    windows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", nargs="*", default=["S1A1E4", "S2A2E8", "S3A3E8"])
    parser.add_argument("--out", default="runs/cmoe_bench")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate only the first N windows (default: all of Hamlet)")
    parser.add_argument("--dense", action="store_true", help="also measure the dense model")
    parser.add_argument("--checkpoints", nargs="*", default=[],
                        help="also measure these checkpoints of ours (e.g. fine-tuned ones)")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import carve_cmoe

    from megatron_grove.gguf_llama import smollm2_hf_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = str(smollm2_hf_dir())
    windows = hamlet_windows(hf_dir, args.window, args.max_windows)

    def report(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    if args.dense:
        ppl, tokens = hf_perplexity(hf_dir, windows)
        report({"model": "dense", "ppl": ppl, "tokens": tokens})
    for spec in args.specs:
        s, a, e = map(int, re.fullmatch(r"S(\d+)A(\d+)E(\d+)", spec).groups())
        target = out / spec
        if not target.exists():
            carve_cmoe.main(["--model", hf_dir, "--shared", str(s), "--active", str(a),
                             "--experts", str(e), "--output", str(target), "--no-progress"])
        record = json.loads((target / "carve.json").read_text())
        ppl, tokens = megatron_perplexity(str(target / "megatron"), windows)
        report({"model": spec, "ppl": ppl, "tokens": tokens,
                "construction_s": record["construction_s"]})
    for checkpoint in args.checkpoints:
        ppl, tokens = megatron_perplexity(checkpoint, windows)
        report({"model": checkpoint, "ppl": ppl, "tokens": tokens})
    return 0


if __name__ == "__main__":
    sys.exit(main())
