"""Convert checkpoints between Hugging Face and Megatron formats (Qwen3-MoE, GroveMoE, dense
Llama / Qwen3), reshard Megatron checkpoints, and upcycle Qwen3-MoE to GroveMoE.

    python tools/convert_checkpoint.py --source-format hf --target-format megatron \\
        --input HF_DIR --output MEGATRON_DIR [--target-tp N --target-ep N]

Tensors keep their dtype (bf16 / fp32). A Megatron checkpoint is a dist_checkpointing folder
that loads at any TP/EP layout (Megatron reshards on load); --target-tp/--target-ep are
checked against the model and recorded as the checkpoint's parallel layout. A GroveMoE HF
export carries our modelling code for transformers 5 (trust_remote_code=True) and records every
routing choice; --hf-flavour release writes what the released GroveMoE code loads instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PROG = "convert_checkpoint.py"
EPILOG = """\
examples:
  HF -> Megatron:        --source-format hf --target-format megatron --input qwen3_moe --output mg
  Megatron -> HF:        --source-format megatron --target-format hf --input mg --output hf_out
  reshard offline:       --source-format megatron --target-format megatron --input mg --output mg_ep4 --target-ep 4
  upcycle to GroveMoE:   --source-format hf --target-format hf --input qwen3_moe --output grove \\
                         --upcycle-grove --num-expert-groups 64 --adjugate-ffn-hidden-size 128 --adjugate-scale 0.05
  release flavour:       --source-format megatron --target-format hf --input mg --output rel \\
                         --hf-flavour release [--drop-expert-bias] --verify
upcycling copies every weight and adds per-group adjugate experts with gate/up ~ N(0, 0.006^2)
and down = 0, and a zero expert bias: the upcycled model computes the source model's function.
Hugging Face input: experts per expert (mlp.experts.{e}.*_proj.weight) or packed as
transformers 5 holds them (mlp.experts.gate_up_proj [E, 2I, H], mlp.experts.down_proj [E, H, I]).
GroveMoE HF output (--hf-flavour default): model_type grove_moe, config.json with
num_expert_groups, adjugate_intermediate_size, adjugate_scale, scoring_func, norm_topk_prob,
expert_bias_in_selection and auto_map to configuration_grove_moe.py / modeling_grove_moe.py
(copied beside the weights): AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True).
--hf-flavour release: model_type qwen3_moe, architectures [GroveMoeForCausalLM], the released
code's fields; refused (naming each difference) unless the model has 2 experts per group,
adjugate size 128, scale 0.05, softmax weights, norm_topk_prob true and no non-zero expert bias
in selection; --drop-expert-bias takes such a bias out of selection after printing how many
expert selections change on sample text. A GroveMoE HF input without expert_bias_in_selection
in its config.json is read as the released code computes it (its bias kept, not selecting).
--verify: after writing, runs source and target (fp32, Hugging Face folders with transformers
where it can) on --verify-tokens tokens and prints logits cosine, max abs difference and top-5
agreement; they disagree (exit code 1) below cosine 0.9999 or top-5 0.99, or above a max abs
difference of 1e-3 x max(1, max |logit|).
the output folder must not exist or be empty.
exit codes: 0 ok, 1 --verify found disagreeing logits (the output is kept for inspection), 2 bad
input (one line on stderr)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG,
                                     description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source-format", choices=["hf", "megatron"], required=True)
    parser.add_argument("--target-format", choices=["hf", "megatron"], required=True)
    parser.add_argument("--input", required=True, help="source checkpoint folder")
    parser.add_argument("--output", required=True, help="new (or empty) output folder")
    parser.add_argument("--target-tp", type=int, default=1,
                        help="Megatron output: tensor-parallel size to record (default 1)")
    parser.add_argument("--target-ep", type=int, default=1,
                        help="Megatron output: expert-parallel size to record (default 1)")
    parser.add_argument("--max-shard-size-mb", type=int, default=5000,
                        help="HF output: largest safetensors shard in MB (default 5000)")
    grove = parser.add_argument_group("upcycling (Qwen3-MoE input -> GroveMoE)")
    grove.add_argument("--upcycle-grove", action="store_true")
    grove.add_argument("--num-expert-groups", type=int, help="G: groups of E/G experts")
    grove.add_argument("--adjugate-ffn-hidden-size", type=int, help="Fa: adjugate FFN size")
    grove.add_argument("--adjugate-scale", type=float, help="lam (must be <= G/E)")
    grove.add_argument("--seed", type=int, default=0, help="seed of the adjugate initialisation")
    hf = parser.add_argument_group("Hugging Face GroveMoE output")
    hf.add_argument("--hf-flavour", choices=["default", "release"], default="default",
                    help="default: our format + modelling code; release: the released code's")
    hf.add_argument("--drop-expert-bias", action="store_true",
                    help="release flavour: take a non-zero selecting expert bias out of selection "
                         "(changes the model; the number of changed selections is printed)")
    check = parser.add_argument_group("verification")
    check.add_argument("--verify", action="store_true",
                       help="after writing, compare source and target logits; exit 1 if they "
                            "disagree")
    check.add_argument("--verify-tokens", type=int, default=256,
                       help="tokens to run for --verify / --drop-expert-bias (default 256)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (one line), or None."""
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        return (f"--output {output}: exists and is not empty; refusing to overwrite (choose a "
                "new folder or empty it)")
    if not Path(args.input).is_dir():
        return f"--input {args.input}: no such directory"
    grove = [args.num_expert_groups, args.adjugate_ffn_hidden_size, args.adjugate_scale]
    if args.upcycle_grove and None in grove:
        return ("--upcycle-grove needs --num-expert-groups, --adjugate-ffn-hidden-size and "
                "--adjugate-scale")
    if not args.upcycle_grove and any(v is not None for v in grove):
        return "--num-expert-groups / --adjugate-* only apply with --upcycle-grove"
    if args.target_format == "hf" and (args.target_tp != 1 or args.target_ep != 1):
        return "--target-tp/--target-ep apply to --target-format megatron only"
    if args.hf_flavour != "default" and args.target_format != "hf":
        return "--hf-flavour applies to --target-format hf only"
    if args.drop_expert_bias and args.hf_flavour != "release":
        return "--drop-expert-bias applies to --hf-flavour release only"
    if args.verify_tokens < 2:
        return f"--verify-tokens {args.verify_tokens}: must be >= 2"
    return None


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.cli import fail

    args = parse_args(argv)
    problem = check_args(args)  # before the heavy imports: bad input fails in a blink
    if problem:
        return fail(PROG, problem)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from megatron_grove.checkpointing import CheckpointError
    from megatron_grove.config import ConfigError
    from megatron_grove.hf_conversion import HFFormatError
    from megatron_grove.hf_conversion.convert import Conversion, convert_checkpoint

    options = vars(args)
    progress = not options.pop("no_progress")
    try:
        result = convert_checkpoint(Conversion(**options), progress)
    except (HFFormatError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        return fail(PROG, exc)
    print("\n".join(result.lines))
    problems = result.comparison.problems() if result.comparison else []
    if problems:
        print(f"{PROG}: verification failed: source and target disagree ({'; '.join(problems)});"
              f" {args.output} is kept for inspection, do not use it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
