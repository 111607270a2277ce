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

PROG = "carve_cmoe.py"
EPILOG = """\
examples:
  python tools/carve_cmoe.py --model DIR_OR.gguf --shared 3 --active 3 --experts 8 --output OUT
  torchrun --nproc-per-node 2 launch/pretrain_grove.py --config OUT/megatron/config.yaml \\
      checkpoint.load=OUT/megatron checkpoint.save=OUT/finetuned train.trainable=router
exit codes: 0 ok, 2 bad input (one line on stderr saying what was wrong)
"""
ROUTER_HELP = ("training-free router: 'linear' (default; ridge fit of the experts' activation "
               "mass from the FFN input, E*H multiply-adds a token) or 'paper' (CMoE's "
               "representative neuron per expert)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_grove.carving.cli import add_carving_arguments

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=int, required=True, help="S: shared experts")
    parser.add_argument("--active", type=int, required=True,
                        help="A: routed experts active per token")
    parser.add_argument("--experts", type=int, required=True,
                        help="N: experts in total, shared included")
    add_carving_arguments(parser, ROUTER_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.carving.cli import run_carving

    args = parse_args(argv)

    def carve(**job) -> dict:
        # torch, transformers and Megatron: imported once --help and the checks have passed
        from megatron_grove.carving.cmoe import CarveSpec
        from megatron_grove.carving.pipeline import CarveJob, carve_model_to

        spec = CarveSpec(args.shared, args.active, args.experts, args.activation_topk,
                         args.router)
        return carve_model_to(CarveJob(spec=spec, **job))

    return run_carving(PROG, args, carve,
                       f"{args.output}/megatron (our trainer) and {args.output}/hf")


if __name__ == "__main__":
    sys.exit(main())
