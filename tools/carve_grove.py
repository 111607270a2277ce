"""Carve a dense Llama/Qwen-style model into a Grove MoE (training-free).

    python tools/carve_grove.py --model SmolLM2.gguf --shared 3 --experts 8 --groups 5 \
        --experts-per-group 2 --adjugate-size 32 --active 6 --output checkpoints/smollm2_grove

Every FFN becomes a shared expert of the S*m most active neurons (m = ceil(d_ffn / N), as
tools/carve_cmoe.py's S shared experts) and G groups of neurons clustered by co-activation; in
each group the a most active neurons form the group's adjugate expert and the others n routed
experts; k routed experts are active per token, routed by a CMoE router (--router; adjugate
scale lam = 1/n; with every expert active the carved model is the dense model; docs/design.md,
"Carving into Grove"). Zero neurons pad d_ffn up to what the shape needs; none is dropped.
Writes into --output:

  megatron/   a model-only Megatron checkpoint our trainer loads (checkpoint.load=...), its
              tokenizer, and config.yaml, the run config to fine-tune it with
              launch/pretrain_grove.py
  carve.json  the carving record: shape, calibration, timings
"""

from __future__ import annotations

import argparse
import sys

PROG = "carve_grove.py"
EPILOG = """\
examples:
  python tools/carve_grove.py --model DIR_OR.gguf --shared 3 --experts 8 --groups 5 \\
      --experts-per-group 2 --adjugate-size 32 --active 6 --output OUT
  torchrun --nproc-per-node 2 launch/pretrain_grove.py --config OUT/megatron/config.yaml \\
      checkpoint.load=OUT/megatron checkpoint.save=OUT/finetuned train.trainable=router
activated FFN neurons per token: S*m + k*m_r + a * (groups hit); m_r (carve.json
"neurons_per_expert") = ceil((ceil((N - S) * m / G) - a) / n)
exit codes: 0 ok, 2 bad input (one line on stderr saying what was wrong)
"""
ROUTER_HELP = ("training-free router: linear (default; ridge fit of what selecting each expert "
               "adds: its activation mass + 1/n of its group's adjugate's) or paper (CMoE's "
               "representative neurons)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from megatron_grove.carving.cli import add_carving_arguments

    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=int, required=True,
                        help="S: the shared expert holds S * ceil(d_ffn / N) neurons")
    parser.add_argument("--experts", type=int, required=True,
                        help="N: CMoE-sized expert slots in total (sets m = ceil(d_ffn / N))")
    parser.add_argument("--groups", type=int, required=True, help="G: expert groups")
    parser.add_argument("--experts-per-group", type=int, required=True,
                        help="n: routed experts per group (E = G * n routed experts)")
    parser.add_argument("--adjugate-size", type=int, required=True,
                        help="a: neurons of each group's adjugate expert")
    parser.add_argument("--active", type=int, required=True,
                        help="k: routed experts active per token")
    add_carving_arguments(parser, ROUTER_HELP)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.carving.cli import run_carving

    args = parse_args(argv)

    def carve(**job) -> dict:
        # torch, transformers and Megatron: imported once --help and the checks have passed
        from megatron_grove.carving.grove import GroveCarveSpec
        from megatron_grove.carving.pipeline import CarveJob, carve_model_to

        spec = GroveCarveSpec(args.shared, args.experts, args.groups, args.experts_per_group,
                              args.adjugate_size, args.active, args.activation_topk,
                              args.router)
        return carve_model_to(CarveJob(spec=spec, **job))

    return run_carving(PROG, args, carve, f"{args.output}/megatron")


if __name__ == "__main__":
    sys.exit(main())
