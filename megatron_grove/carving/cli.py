"""What the carving tools (``tools/carve_cmoe.py``, ``tools/carve_grove.py``) share on the
command line: the dense model, the output folder, calibration and router options, the checks
of those inputs and the summary line printed after a carving."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

from megatron_grove.carving.spec import Router
from megatron_grove.cli import fail

__all__ = ["add_carving_arguments", "carving_input_problem", "carving_summary", "run_carving"]


def add_carving_arguments(parser: argparse.ArgumentParser, router_help: str) -> None:
    """The options every carving takes besides its shape: ``--model``, ``--output``,
    ``--router`` (explained by ``router_help``), calibration, ``--seq-length``,
    ``--no-progress``."""
    parser.add_argument("--model", required=True,
                        help="dense model: a Hugging Face directory (config.json + safetensors) "
                             "or a .gguf file (Llama architecture)")
    parser.add_argument("--output", required=True, help="output directory (must not exist)")
    parser.add_argument("--router", choices=[r.value for r in Router],
                        default=Router.LINEAR.value, help=router_help)
    parser.add_argument("--calibration", default=None,
                        help="calibration text file (default: the embedded Shakespeare corpus)")
    parser.add_argument("--calibration-tokens", type=int, default=2048,
                        help="calibration tokens, in windows of --window tokens (default 2048)")
    parser.add_argument("--window", type=int, default=512,
                        help="calibration window length in tokens (default 512)")
    parser.add_argument("--activation-topk", type=int, default=None,
                        help="K_a: neurons each calibration token marks active "
                             "(default d_ffn // 10)")
    parser.add_argument("--seq-length", type=int, default=512,
                        help="model.seq_length of the written run config (default 512)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def carving_input_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the files a carving was given (one line), or None."""
    if Path(args.output).exists():
        return f"--output {args.output} exists; choose a new directory"
    model = Path(args.model)
    if not (model.is_file() and model.suffix == ".gguf") and not (model / "config.json").is_file():
        return (f"--model {model}: neither a .gguf file nor a Hugging Face directory with "
                "config.json")
    if args.calibration and not Path(args.calibration).is_file():
        return f"--calibration {args.calibration}: no such file"
    return None


def carving_summary(record: dict[str, Any], wrote: str) -> str:
    """The line a carving tool prints: shape, router, the seconds of each phase and what it
    wrote (``wrote``, e.g. ``OUT/megatron``)."""
    return (f"carved {record['spec']} ({record['router']} router) in "
            f"{record['construction_s']:.1f} s (read {record['read_s']:.1f} s, calibration "
            f"{record['calibration_s']:.1f} s on {record['calibration_tokens']} tokens, "
            f"clustering {record['clustering_s']:.1f} s); wrote {wrote} in "
            f"{record['writing_s']:.1f} s")


def run_carving(prog: str, args: argparse.Namespace, carve: Callable[..., dict],
                wrote: str) -> int:
    """A carving tool's ``main`` after parsing: check the inputs, call ``carve(**job)`` with
    the job fields every carving shares (model, output, calibration, window, seq_length,
    progress), print the summary line; bad input (``ValueError``: HFFormatError and
    ConfigError included) is one line and exit code 2."""
    problem = carving_input_problem(args)
    if problem:
        return fail(prog, problem)
    try:
        record = carve(model=args.model, output=args.output, calibration=args.calibration,
                       calibration_tokens=args.calibration_tokens, window=args.window,
                       seq_length=args.seq_length, progress=not args.no_progress)
    except ValueError as exc:
        return fail(prog, str(exc))
    print(carving_summary(record, wrote))
    return 0
