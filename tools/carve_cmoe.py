"""Carve a dense Llama/Qwen-style model into a CMoE mixture of experts (training-free).

    python tools/carve_cmoe.py --model SmolLM2.gguf --shared 3 --active 3 --experts 8 \
        --output checkpoints/smollm2_s3a3e8

Every FFN becomes S shared + (N - S) routed experts of ceil(d_ffn / N) neurons (zero neurons
pad d_ffn up to a multiple of N, none is dropped), A routed experts active per token, routed by
a training-free router (docs/design.md, "CMoE"): by default a linear router fitted in closed
form to the experts' activation mass on the calibration tokens (--router linear), or the
paper's representative-neuron router (--router paper). Writes into --output:

  megatron/   a model-only Megatron checkpoint our trainer loads (checkpoint.load=...) and
              config.yaml, the run config to fine-tune it with launch/pretrain_grove.py
  hf/         a Hugging Face-style export: config.json (+ "cmoe" fields), safetensors (one
              model.safetensors, sharded past 5 GiB), tokenizer files
  carve.json  the carving record: shape, router, calibration, wall and CPU seconds of each
              phase (read, calibration, clustering, writing)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "carve_cmoe.py"
EPILOG = """\
examples:
  python tools/carve_cmoe.py --model DIR_OR.gguf --shared 3 --active 3 --experts 8 --output OUT
  torchrun --nproc-per-node 2 launch/pretrain_grove.py --config OUT/megatron/config.yaml \\
      checkpoint.load=OUT/megatron checkpoint.save=OUT/finetuned train.trainable=router
exit codes: 0 ok, 2 bad input (one line on stderr saying what was wrong)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="dense model: a Hugging Face directory (config.json + safetensors) "
                             "or a .gguf file (Llama architecture)")
    parser.add_argument("--shared", type=int, required=True, help="S: shared experts")
    parser.add_argument("--active", type=int, required=True,
                        help="A: routed experts active per token")
    parser.add_argument("--experts", type=int, required=True,
                        help="N: experts in total, shared included")
    parser.add_argument("--output", required=True, help="output directory (must not exist)")
    parser.add_argument("--calibration", default=None,
                        help="calibration text file (default: the embedded Shakespeare corpus)")
    parser.add_argument("--calibration-tokens", type=int, default=2048,
                        help="calibration tokens, in windows of --window tokens (default 2048)")
    parser.add_argument("--window", type=int, default=512,
                        help="calibration window length in tokens (default 512)")
    parser.add_argument("--activation-topk", type=int, default=None,
                        help="K_a: neurons each calibration token marks active "
                             "(default d_ffn // 10)")
    parser.add_argument("--router", choices=["linear", "paper"], default="linear",
                        help="training-free router: 'linear' (default; ridge fit of the "
                             "experts' activation mass from the FFN input, E*H multiply-adds "
                             "a token) or 'paper' (CMoE's representative neuron per expert)")
    parser.add_argument("--seq-length", type=int, default=512,
                        help="model.seq_length of the written run config (default 512)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.cli import fail

    args = parse_args(argv)
    if Path(args.output).exists():
        return fail(PROG, f"--output {args.output} exists; choose a new directory")
    model = Path(args.model)
    if not (model.is_file() and model.suffix == ".gguf") and not (model / "config.json").is_file():
        return fail(PROG, f"--model {model}: neither a .gguf file nor a Hugging Face directory "
                     "with config.json")
    if args.calibration and not Path(args.calibration).is_file():
        return fail(PROG, f"--calibration {args.calibration}: no such file")
    try:
        from megatron_grove.cmoe.carve_model import CarveSpec
        from megatron_grove.cmoe.pipeline import CarveJob, carve_model_to

        spec = CarveSpec(args.shared, args.active, args.experts, args.activation_topk,
                         args.router)
        record = carve_model_to(CarveJob(
            model=args.model, spec=spec, output=args.output, calibration=args.calibration,
            calibration_tokens=args.calibration_tokens, window=args.window,
            seq_length=args.seq_length, progress=not args.no_progress))
    except ValueError as exc:  # HFFormatError and ConfigError included
        return fail(PROG, str(exc))
    print(f"carved {record['spec']} ({record['router']} router) in "
          f"{record['construction_s']:.1f} s (read {record['read_s']:.1f} s, calibration "
          f"{record['calibration_s']:.1f} s on {record['calibration_tokens']} tokens, clustering "
          f"{record['clustering_s']:.1f} s); wrote {args.output}/megatron (our trainer) and "
          f"{args.output}/hf in {record['writing_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
