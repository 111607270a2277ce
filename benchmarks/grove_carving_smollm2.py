"""Grove carving vs CMoE carving of SmolLM2-135M-Instruct at about equal activated FFN neurons
per token: perplexity on held-out text, neurons activated, carving times.

    python benchmarks/grove_carving_smollm2.py --grove S3E8-G5n2a32k6 --cmoe S3A3E8 \
        --max-windows 20 --out runs/grove_bench [--checkpoints FINETUNED ...]

Grove specs are SxEy-GgNnAaKk[-paper] (tools/carve_grove.py's --shared, --experts, --groups,
--experts-per-group, --adjugate-size, --active; linear router unless -paper), CMoE specs SxAyEz
(linear router). Every model is carved into OUT (kept if there) and scored through our
Megatron model with the window convention of tools/evaluate.py; activated neurons come from the
Grove layers' counters. One JSON line per model is appended to OUT/results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_grove.benchmarking.cmoe import carve_and_measure, heldout_tokens
from megatron_grove.benchmarking.grove_carving import (
    carve_grove_and_measure,
    cmoe_activated_neurons,
    measure_checkpoint,
)
from megatron_grove.hf_conversion.gguf import smollm2_hf_dir
from megatron_grove.carving.pipeline import CarveJob
from megatron_grove.data import heldout_text_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grove_carving_smollm2.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--grove", nargs="*", default=["S3E8-G5n2a32k6"],
                        help="Grove carvings, SxEy-GgNnAaKk (default S3E8-G5n2a32k6)")
    parser.add_argument("--cmoe", nargs="*", default=["S3A3E8"],
                        help="CMoE carvings to compare with, SxAyEz (default S3A3E8)")
    parser.add_argument("--checkpoints", nargs="*", default=[],
                        help="also measure these checkpoints of ours (e.g. fine-tuned ones)")
    parser.add_argument("--out", default="runs/grove_bench")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--text", default=heldout_text_path(),
                        help="held-out text file (default: the embedded Hamlet)")
    parser.add_argument("--model", default=None,
                        help="dense model to carve into Grove: HF folder or .gguf (default: the "
                             "cached SmolLM2-135M-Instruct HF folder)")
    parser.add_argument("--calibration-tokens", type=int, default=None,
                        help="calibration tokens of every carving (default: the tools')")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate only the first N windows (default: the whole text)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hf_dir = str(smollm2_hf_dir())
    tokens = heldout_tokens(hf_dir, args.text, args.window, args.max_windows)

    def report(record: dict) -> None:
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    for spec in args.grove:
        report(carve_grove_and_measure(args.model or hf_dir, spec, out, tokens, args.window,
                                       args.calibration_tokens))
    calibration_tokens = args.calibration_tokens or CarveJob.calibration_tokens
    for spec in args.cmoe:  # through our Megatron model, as the Grove carvings
        records = carve_and_measure(args.model or hf_dir, spec, "linear", out,
                                    {Path(args.text).stem: tokens}, args.window,
                                    calibration_tokens, megatron=True)
        activated = cmoe_activated_neurons(spec, out / f"{spec}_linear_{calibration_tokens}")
        for record in records:
            if record["via"] == "megatron":
                report({**record, **activated})
    for checkpoint in args.checkpoints:
        report({"model": checkpoint, **measure_checkpoint(checkpoint, tokens, args.window)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
