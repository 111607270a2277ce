"""Perplexity of a Megatron or Hugging Face checkpoint, computed with our model code.

    python tools/evaluate.py --checkpoint DIR (--tokens FILE.npy | --text FILE) [--seq-length L] [--json]

DIR is auto-detected: a Hugging Face folder (config.json + safetensors; Llama, Qwen3,
Qwen3-MoE, GroveMoE) or a Megatron checkpoint (root with latest_checkpointed_iteration.txt or
an iter_* folder; from training or tools/convert_checkpoint.py). Window k covers tokens
[kL, kL+L]: inputs its first L, targets its last L; windows that do not fit are dropped;
PPL = exp(mean NLL over all targets).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "evaluate.py"
EPILOG = """\
--text uses the checkpoint's tokenizer (tokenizer/ of a Megatron checkpoint, tokenizer.json of
a Hugging Face folder); --tokens takes a 1-D .npy array of token ids.
output: a summary line; with --json, one JSON object {"ppl", "nll", "tokens", "windows",
"seq_length", "checkpoint", "format"} as the last line.
exit codes: 0 ok, 2 bad input (one line on stderr saying what was wrong)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Megatron or Hugging Face checkpoint")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="1-D .npy array of token ids")
    source.add_argument("--text", help="UTF-8 text file, tokenised with the checkpoint's tokenizer")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="window length L (default: the model's model.seq_length, at most 2048)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "checkpoint"], default="fp32",
                        help="compute dtype (default fp32; 'checkpoint': the weights' own)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")  # torch's import-time CUDA notice
    import numpy as np

    from megatron_grove.checkpointing import CheckpointError
    from megatron_grove.cli import fail
    from megatron_grove.config import ConfigError
    from megatron_grove.data.tokenizer import load_tokenizer
    from megatron_grove.evaluation import load_for_evaluation, perplexity
    from megatron_grove.hf_conversion import HFFormatError
    from megatron_grove.runtime import single_process_world

    ckpt = Path(args.checkpoint)
    if not ckpt.is_dir():
        return fail(PROG, f"--checkpoint {ckpt}: no such directory")
    if args.seq_length is not None and args.seq_length < 1:
        return fail(PROG, f"--seq-length {args.seq_length}: must be >= 1")
    try:
        with single_process_world(device=args.device) as runtime:
            device = runtime.device
            loaded = load_for_evaluation(ckpt, None if args.dtype == "checkpoint" else args.dtype,
                                         device)
            cfg, model, fmt, tokenizer_dir = (loaded.config, loaded.model, loaded.format,
                                              loaded.tokenizer_dir)
            if args.tokens:
                try:
                    tokens = np.load(args.tokens)
                except (OSError, ValueError) as exc:
                    return fail(PROG, f"--tokens {args.tokens}: cannot read a .npy array ({exc})")
                if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
                    return fail(PROG, f"--tokens {args.tokens}: expected a 1-D integer array, got "
                                 f"shape {tokens.shape} dtype {tokens.dtype}")
            else:
                if tokenizer_dir is None:
                    return fail(PROG, f"--text: {ckpt} carries no tokenizer; pass --tokens instead")
                try:
                    text = Path(args.text).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    return fail(PROG, f"--text {args.text}: cannot read UTF-8 text ({exc})")
                tokens = np.asarray(load_tokenizer(tokenizer_dir).encode(text), dtype=np.int64)
            seq_length = args.seq_length or min(cfg.model.seq_length, 2048)
            result = perplexity(model, tokens, seq_length, cfg.model.vocab_size,
                                batch_size=args.batch_size, device=device,
                                progress=not args.no_progress)
    except (HFFormatError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(PROG, exc)
    print(f"{fmt} checkpoint {ckpt}: ppl {result.ppl:.4f} (nll {result.nll:.6f}) over "
          f"{result.tokens} tokens in {result.windows} windows of {seq_length}")
    if args.json:
        print(json.dumps({"ppl": result.ppl, "nll": result.nll, "tokens": result.tokens,
                          "windows": result.windows, "seq_length": seq_length,
                          "checkpoint": str(ckpt), "format": fmt}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
