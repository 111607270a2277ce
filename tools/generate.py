"""Generate text from a Megatron or Hugging Face checkpoint: prompt in, text out.

    python tools/generate.py --checkpoint DIR --prompt "To be, or not to be" [--max-new-tokens N]
        [--temperature T --top-k K --seed S] [--backend auto|transformers|ours] [--device D]
        [--json]
    python tools/generate.py --checkpoint DIR --chat --prompt "Who speaks?" [--system TEXT]

DIR is auto-detected: a Megatron checkpoint (root or iter_* folder; our model code) or a
Hugging Face folder (transformers' generate() with a KV cache when transformers can run it:
Llama, Qwen3, Qwen3-MoE, or a GroveMoE export of ours with its modelling code; otherwise our
model code through the converter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "generate.py"
EPILOG = """\
decoding: --temperature 0 (default) is greedy, and greedy tokens are the same on every backend;
--temperature T > 0 samples from softmax(logits / T) over the --top-k most likely tokens (0: all)
with a generator seeded by --seed (reproducible on one backend). Generation stops after
--max-new-tokens or at the tokenizer's end-of-document token. The prompt is tokenised with the
checkpoint's tokenizer (tokenizer/ of a Megatron checkpoint, tokenizer.json of an HF folder).
backends: auto (transformers for an HF folder it can run, else ours), transformers (HF folders
of those kinds only), ours (our Megatron model; recomputes the context for every token, keeps
the last model.seq_length tokens).
chat (--chat): --prompt is a user turn (after a --system turn, if given), rendered with the
checkpoint tokenizer's chat template (its chat_template.jinja or tokenizer_config.json's
chat_template; ChatML otherwise, as tools/preprocess_data.py --chat uses) and the generation
prompt; generation also stops at the end of the assistant's turn (the template's end-of-turn
marker, ChatML's <|im_end|>), and only the answer is printed. docs/sft.md.
output: the prompt followed by the generated text (--chat: the answer); with --json, one JSON
object {"prompt", "completion", "prompt_ids", "completion_ids", "backend", "checkpoint"} (+
"answer", "turn_ended" with --chat) as the last line.
exit codes: 0 ok, 2 bad input (one line on stderr saying what was wrong)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                     epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="Megatron or Hugging Face checkpoint")
    parser.add_argument("--prompt", required=True, help="text to continue (--chat: the user turn)")
    parser.add_argument("--chat", action="store_true",
                        help="apply the chat template; print the assistant's answer")
    parser.add_argument("--system", default=None, help="--chat: a system turn before the prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="default 64")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (default): greedy; > 0: sampling")
    parser.add_argument("--top-k", type=int, default=0, help="sampling: top-k tokens (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--backend", choices=["auto", "transformers", "ours"], default="auto")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda when available (fp32 either way)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    return parser.parse_args(argv)


def check_args(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (one line), or None."""
    if not Path(args.checkpoint).is_dir():
        return f"--checkpoint {args.checkpoint}: no such directory"
    if args.max_new_tokens < 1:
        return f"--max-new-tokens {args.max_new_tokens}: must be >= 1"
    if args.temperature < 0:
        return f"--temperature {args.temperature}: must be >= 0 (0 = greedy)"
    if args.top_k < 0:
        return f"--top-k {args.top_k}: must be >= 0 (0 = all tokens)"
    if args.system is not None and not args.chat:
        return "--system: needs --chat"
    if args.chat and not args.prompt.strip():
        return "--prompt: empty user turn"
    return None


def main(argv: list[str] | None = None) -> int:
    from megatron_grove.cli import fail

    args = parse_args(argv)
    problem = check_args(args)
    if problem:
        return fail(PROG, problem)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from megatron_grove.checkpointing import CheckpointError
    from megatron_grove.config import ConfigError
    from megatron_grove.data.chat import ChatTemplate
    from megatron_grove.data.tokenizer import load_tokenizer
    from megatron_grove.generation import Sampling, load_generator
    from megatron_grove.hf_conversion import HFFormatError
    from megatron_grove.runtime import single_process_world

    sampling = Sampling(args.max_new_tokens, args.temperature, args.top_k, args.seed)
    try:
        with single_process_world(device=args.device) as runtime:
            generator = load_generator(args.checkpoint, args.backend, runtime.device)
            if generator.tokenizer_dir is None:
                return fail(PROG, f"--checkpoint {args.checkpoint}: carries no tokenizer")
            tokenizer = load_tokenizer(generator.tokenizer_dir)
            template, stop = None, None
            if args.chat:
                template = ChatTemplate.for_tokenizer(generator.tokenizer_dir, tokenizer)
                messages = ([{"role": "system", "content": args.system}] if args.system else []
                            ) + [{"role": "user", "content": args.prompt}]
                prompt_ids, stop = template.encode_prompt(messages), template.turn_ended
            else:
                prompt_ids = tokenizer.encode(args.prompt)
            if not prompt_ids:
                return fail(PROG, "--prompt: empty after tokenisation")
            new_ids = generator.generate(prompt_ids, sampling, tokenizer.eod, stop)
    except (HFFormatError, ConfigError, CheckpointError, FileNotFoundError, ValueError) as exc:
        return fail(PROG, exc)
    completion = tokenizer.decode(new_ids)
    result = {"prompt": args.prompt, "completion": completion, "prompt_ids": prompt_ids,
              "completion_ids": new_ids, "backend": generator.backend,
              "checkpoint": args.checkpoint}
    if template is not None:
        answer, ended = template.answer_of(tokenizer.decode(new_ids, skip_special_tokens=False))
        result.update(answer=answer.strip(), turn_ended=ended)
        print(result["answer"])
    else:
        print(args.prompt + completion)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
