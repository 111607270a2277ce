"""Carve a dense Llama/Qwen-style model into a CMoE mixture of experts (training-free).

    python tools/carve_cmoe.py --model SmolLM2.gguf --shared 3 --active 3 --experts 8 \
        --output checkpoints/smollm2_s3a3e8

Every FFN becomes S shared + (N - S) routed experts of ceil(d_ffn / N) neurons (zero neurons
pad d_ffn up to a multiple of N, none is dropped), A routed experts active per token, routed by
CMoE's training-free router (DESIGN.md section 3). Writes into --output:

  megatron/   a model-only Megatron checkpoint our trainer loads (checkpoint.load=...) and
              config.yaml, the run config to fine-tune it with launch/pretrain_grove.py
  hf/         a Hugging Face-style export: config.json (+ "cmoe" fields), safetensors (one
              model.safetensors, sharded past 5 GiB), tokenizer files
  carve.json  the carving record: shape, calibration, construction time
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import uuid
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
    parser.add_argument("--calibration-tokens", type=int, default=4096,
                        help="calibration tokens, in windows of --window tokens (default 4096)")
    parser.add_argument("--window", type=int, default=512,
                        help="calibration window length in tokens (default 512)")
    parser.add_argument("--activation-topk", type=int, default=None,
                        help="K_a: neurons each calibration token marks active "
                             "(default d_ffn // 10)")
    parser.add_argument("--seq-length", type=int, default=512,
                        help="model.seq_length of the written run config (default 512)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def calibration_token_windows(tokenizer, text: str, tokens: int, window: int):
    """The first ``tokens`` tokens of ``text`` as ``[tokens // window, window]`` ids."""
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = min(tokens, len(ids)) // window
    if rows < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window "
                         f"({window}); give a longer --calibration file or a smaller --window")
    return torch.tensor(ids[:rows * window]).reshape(rows, window)


def _default_calibration_text() -> str:
    from megatron_grove.data import embedded_train_files

    return "\n\n".join(Path(f).read_text() for f in embedded_train_files())


def write_megatron_checkpoint(cfg, dense_cfg, hf_state: dict, carved: list,
                              folder: Path) -> None:
    """The carved model as a model-only Megatron checkpoint in ``folder``: the dense tensors through the HF -> Megatron mapping of the dense model
    ``dense_cfg``, every FFN replaced by its carved experts and router."""
    from megatron_grove.cmoe.weights import carved_ffn_to_megatron
    from megatron_grove.hf_conversion.megatron_io import save_megatron_checkpoint
    from megatron_grove.hf_conversion.tensor_mapping import hf_to_megatron
    from megatron_grove.runtime import single_process_world

    state = {name: tensor for name, tensor in hf_to_megatron(hf_state, dense_cfg).items()
             if ".mlp." not in name}
    for i, ffn in enumerate(carved):
        state.update(carved_ffn_to_megatron(ffn, f"decoder.layers.{i}.mlp."))
    with single_process_world():
        save_megatron_checkpoint(folder, cfg, state)


def _write_run_config(cfg, folder: Path) -> None:
    import yaml

    from megatron_grove.config import config_to_dict

    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def write_hf_export(hf_dir: Path, hf_config: dict, hf_state: dict, carved: list, spec,
                    folder: Path) -> None:
    """The Hugging Face-style export: dense tensors as in ``hf_dir``, FFNs as CMoE experts,
    ``hf_dir``'s tokenizer files."""
    from megatron_grove.cmoe.weights import carved_ffn_to_hf
    from megatron_grove.hf_conversion.safetensors_io import write_hf_checkpoint

    tensors = {k: v for k, v in hf_state.items() if ".mlp." not in k}
    for i, ffn in enumerate(carved):
        tensors.update(carved_ffn_to_hf(ffn, f"model.layers.{i}.mlp."))
    m = spec.neurons_per_expert(hf_config["intermediate_size"])
    config = dict(hf_config, cmoe={
        "num_shared_experts": spec.shared, "num_routed_experts": spec.experts - spec.shared,
        "num_experts_per_tok": spec.active, "expert_intermediate_size": m,
        "dense_intermediate_size": hf_config["intermediate_size"],
        "router": "softmax over |silu(gate_rows x) * (up_rows x)|, top-k of scores + "
                  "expert_bias, weight 1 + score * expert_scale"})
    write_hf_checkpoint(folder, config, tensors, tokenizer_dir=hf_dir)


def carve(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_grove.checkpointing import TOKENIZER_DIR
    from megatron_grove.cmoe.carve_model import (CarveSpec, calibration_inputs, carve_model,
                                                 carved_run_config)
    from megatron_grove.gguf_llama import gguf_to_hf_dir
    from megatron_grove.hf_conversion.hf_config import grove_config_from_hf
    from megatron_grove.hf_conversion.safetensors_io import (HFTensors, copy_tokenizer_files,
                                                             read_hf_config)

    spec = CarveSpec(args.shared, args.active, args.experts, args.activation_topk)
    output = Path(args.output)
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        began = time.perf_counter()
        hf_dir = Path(args.model)
        if hf_dir.suffix == ".gguf":
            hf_dir = gguf_to_hf_dir(hf_dir, tmp / "dense_from_gguf")
        hf_config = read_hf_config(hf_dir)
        with HFTensors(hf_dir) as tensors:
            hf_state = {name: tensors[name].float() for name in tensors}
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        text = (Path(args.calibration).read_text() if args.calibration
                else _default_calibration_text())
        windows = calibration_token_windows(tokenizer, text, args.calibration_tokens, args.window)
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        inputs = calibration_inputs(model, windows)
        del model
        calibrated = time.perf_counter()
        carved = carve_model(hf_state, hf_config["num_hidden_layers"], inputs, spec,
                             progress=not args.no_progress)
        carve_seconds = time.perf_counter() - began
        write_hf_export(hf_dir, hf_config, hf_state, carved, spec, tmp / "hf")
        dense_cfg = grove_config_from_hf(hf_config, hf_state)
        # the tokenizer is the export's, at its place after the final rename
        cfg = carved_run_config(dense_cfg, spec, args.seq_length, str((output / "hf").resolve()))
        copy_tokenizer_files(tmp / "hf", tmp / "megatron" / TOKENIZER_DIR)  # its own copy
        write_megatron_checkpoint(cfg, dense_cfg, hf_state, carved, tmp / "megatron")
        _write_run_config(cfg, tmp / "megatron")
        record = {"spec": spec.name, "model": str(args.model),
                  "calibration_tokens": int(windows.numel()), "window": args.window,
                  "activation_topk": spec.active_neurons(hf_config["intermediate_size"]),
                  "neurons_per_expert": spec.neurons_per_expert(hf_config["intermediate_size"]),
                  "calibration_s": round(calibrated - began, 2),
                  "construction_s": round(carve_seconds, 2)}
        (tmp / "carve.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(tmp / "dense_from_gguf", ignore_errors=True)  # the .gguf's dense HF copy
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


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

        CarveSpec(args.shared, args.active, args.experts, args.activation_topk)
        record = carve(args)
    except ValueError as exc:  # HFFormatError and ConfigError included
        return fail(PROG, str(exc))
    print(f"carved {record['spec']} in {record['construction_s']:.1f} s (calibration "
          f"{record['calibration_s']:.1f} s, {record['calibration_tokens']} tokens); wrote "
          f"{args.output}/megatron (our trainer) and {args.output}/hf")
    return 0


if __name__ == "__main__":
    sys.exit(main())
