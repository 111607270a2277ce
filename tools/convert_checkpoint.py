"""Convert checkpoints between Hugging Face and Megatron formats (Qwen3-MoE, GroveMoE, dense
Llama / Qwen3), reshard Megatron checkpoints, and upcycle Qwen3-MoE to GroveMoE.

    python tools/convert_checkpoint.py --source-format hf --target-format megatron \\
        --input HF_DIR --output MEGATRON_DIR [--target-tp N --target-ep N]

Tensors keep their dtype (bf16 / fp32). A Megatron checkpoint is a dist_checkpointing folder
that loads at any TP/EP layout (Megatron reshards on load); --target-tp/--target-ep are
checked against the model and recorded as the checkpoint's parallel layout.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

PROG = "convert_checkpoint.py"
EPILOG = """\
examples:
  HF -> Megatron:        --source-format hf --target-format megatron --input qwen3_moe --output mg
  Megatron -> HF:        --source-format megatron --target-format hf --input mg --output hf_out
  reshard offline:       --source-format megatron --target-format megatron --input mg --output mg_ep4 --target-ep 4
  upcycle to GroveMoE:   --source-format hf --target-format hf --input qwen3_moe --output grove \\
                         --upcycle-grove --num-expert-groups 64 --adjugate-ffn-hidden-size 128 --adjugate-scale 0.05
upcycling copies every weight and adds per-group adjugate experts with gate/up ~ N(0, 0.006^2)
and down = 0, and a zero expert bias: the upcycled model computes the source model's function.
the output folder must not exist or be empty. exit codes: 0 ok, 2 bad input (one line on stderr)
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
    return None


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.cli import fail

    args = parse_args(argv)
    problem = check_args(args)  # before the heavy imports: bad input fails in a blink
    if problem:
        return fail(PROG, problem)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from megatron_grove.checkpointing import CheckpointError
    from megatron_grove.config import ConfigError
    from megatron_grove.hf_conversion import HFFormatError
    from megatron_grove.hf_conversion.convert import Conversion, convert_checkpoint

    options = vars(args)
    progress = not options.pop("no_progress")
    try:
        print(convert_checkpoint(Conversion(**options), progress))
    except (HFFormatError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        return fail(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
