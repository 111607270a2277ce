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


class InputError(ValueError):
    """Bad command-line input; printed as one line, exit code 2."""


def _check_args(args: argparse.Namespace) -> None:
    output = Path(args.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise InputError(f"--output {output}: exists and is not empty; refusing to overwrite "
                         "(choose a new folder or empty it)")
    if not Path(args.input).is_dir():
        raise InputError(f"--input {args.input}: no such directory")
    grove = [args.num_expert_groups, args.adjugate_ffn_hidden_size, args.adjugate_scale]
    if args.upcycle_grove and None in grove:
        raise InputError("--upcycle-grove needs --num-expert-groups, --adjugate-ffn-hidden-size "
                         "and --adjugate-scale")
    if not args.upcycle_grove and any(v is not None for v in grove):
        raise InputError("--num-expert-groups / --adjugate-* only apply with --upcycle-grove")
    if args.target_format == "hf" and (args.target_tp != 1 or args.target_ep != 1):
        raise InputError("--target-tp/--target-ep apply to --target-format megatron only")


def convert(args: argparse.Namespace) -> str:
    """Run the conversion; return a one-line summary."""
    from tqdm import tqdm

    from megatron_grove.config import validate_layout
    from megatron_grove.hf_conversion import (load_hf_checkpoint, load_megatron_state,
                                              save_hf_checkpoint, save_megatron_checkpoint,
                                              upcycle_to_grove)
    from megatron_grove.runtime import single_process_world
    from megatron_grove.checkpointing import checkpoint_tokenizer

    def progress(desc: str):
        return lambda it: tqdm(it, desc=desc, unit="tensor", disable=args.no_progress)

    with single_process_world(device="cpu"):
        if args.source_format == "hf":
            cfg, state = load_hf_checkpoint(args.input, progress("read hf"))
            tokenizer_dir = cfg.data.tokenizer
        else:
            cfg, state = load_megatron_state(args.input)
            tokenizer_dir = checkpoint_tokenizer(args.input)
        if args.upcycle_grove:
            cfg, state = upcycle_to_grove(cfg, state, args.num_expert_groups,
                                          args.adjugate_ffn_hidden_size, args.adjugate_scale,
                                          seed=args.seed)
        if args.target_format == "megatron":
            p = cfg.parallel
            p.tensor_model_parallel_size, p.expert_model_parallel_size = (args.target_tp,
                                                                          args.target_ep)
            p.sequence_parallel = args.target_tp > 1 and cfg.moe.num_experts > 0
            validate_layout(cfg, args.target_tp * args.target_ep)
            _check_tp(cfg, args.target_tp)
            cfg.data.tokenizer = tokenizer_dir
            save_megatron_checkpoint(args.output, cfg, state)
        else:
            save_hf_checkpoint(args.output, cfg, state, tokenizer_dir=tokenizer_dir,
                               max_shard_bytes=args.max_shard_size_mb * 2 ** 20,
                               progress=progress("write hf"))
    kind = ("GroveMoE" if cfg.moe.num_expert_groups else "MoE" if cfg.moe.num_experts
            else "dense")
    return (f"wrote {args.target_format} checkpoint {args.output}: {kind} model, "
            f"{cfg.model.num_layers} layers, {len(state)} tensors, {cfg.runtime.dtype}")


def _check_tp(cfg, tp: int) -> None:
    from megatron_grove.config import ConfigError

    m, e = cfg.model, cfg.moe
    sizes = {"model.num_attention_heads": m.num_attention_heads,
             "model.num_query_groups": m.num_query_groups or m.num_attention_heads,
             "model.ffn_hidden_size": m.ffn_hidden_size}
    if e.num_experts:
        sizes["moe.ffn_hidden_size"] = e.ffn_hidden_size
    if e.num_expert_groups:
        sizes["moe.adjugate_ffn_hidden_size"] = e.adjugate_ffn_hidden_size
    for key, value in sizes.items():
        if value % tp:
            raise ConfigError(f"--target-tp {tp}: must divide {key}={value}")


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.cli import fail

    args = parse_args(argv)
    try:
        _check_args(args)  # before the heavy imports: bad input fails in a blink
    except InputError as exc:
        return fail(PROG, exc)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from megatron_grove.checkpointing import CheckpointError
    from megatron_grove.config import ConfigError
    from megatron_grove.hf_conversion import HFFormatError

    try:
        print(convert(args))
    except (HFFormatError, ConfigError, CheckpointError, FileNotFoundError) as exc:
        return fail(PROG, exc)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
