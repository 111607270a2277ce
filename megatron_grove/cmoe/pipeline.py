"""Carving a dense model end to end: read it (HF folder or ``.gguf``, never converted to disk),
calibrate on text (one forward capturing every FFN's input and hidden activations), carve
every FFN, write the Megatron checkpoint, its run config and the HF-style export into a new
folder (built under a temporary name and renamed into place: a failed carving leaves nothing).

Output folder::

    megatron/   model-only Megatron checkpoint (checkpoint.load=...) + config.yaml (run config)
    hf/         HF-style export: config.json (+ "cmoe"), safetensors, tokenizer files
    carve.json  the carving record: shape, router, calibration, timings of each phase
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from megatron_grove.cmoe.carve_model import CarveSpec

__all__ = ["CarveJob", "calibration_token_windows", "default_calibration_text", "read_dense",
           "calibrate", "carve_model_to"]


@dataclass
class CarveJob:
    """One carving (the carving tool's arguments)."""

    model: str  # HF folder or .gguf file
    spec: CarveSpec
    output: str
    calibration: Optional[str] = None  # text file; None: the embedded training corpus
    calibration_tokens: int = 2048
    window: int = 512
    seq_length: int = 512  # model.seq_length of the written run config
    progress: bool = True


def calibration_token_windows(tokenizer, text: str, tokens: int, window: int) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` as ``[tokens // window, window]`` ids."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = min(tokens, len(ids)) // window
    if rows < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window "
                         f"({window}); give a longer --calibration file or a smaller --window")
    return torch.tensor(ids[:rows * window]).reshape(rows, window)


def default_calibration_text() -> str:
    """The embedded training plays, concatenated."""
    from megatron_grove.data import embedded_train_files

    return "\n\n".join(Path(f).read_text() for f in embedded_train_files())


def read_dense(model: Path, tokenizer_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, fp32 state dict) of a ``.gguf`` file or an HF folder; the tokenizer's
    files go to ``tokenizer_dir``."""
    from megatron_grove.hf_conversion.safetensors_io import (
        HFTensors,
        copy_tokenizer_files,
        read_hf_config,
    )

    if model.suffix == ".gguf":
        from megatron_grove.cmoe.gguf import GGUFFile, gguf_tokenizer, read_gguf_llama

        reader = GGUFFile(model)
        gguf_tokenizer(reader).save_pretrained(str(tokenizer_dir))
        return read_gguf_llama(reader)
    copy_tokenizer_files(model, tokenizer_dir)
    with HFTensors(model) as tensors:
        return read_hf_config(model), {name: tensors[name].float() for name in tensors}


def calibrate(job, tokenizer, hf_config: dict, hf_state: dict[str, torch.Tensor]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The calibration forward of a carving job (``job.calibration`` / ``calibration_tokens``
    / ``window``): every layer's FFN inputs ``[T, H]`` and hidden activations ``[T, d_ffn]``
    on the job's calibration tokens, from the dense model ``hf_config`` / ``hf_state``."""
    from megatron_grove.cmoe.carve_model import calibration_activations, dense_model

    text = (Path(job.calibration).read_text() if job.calibration
            else default_calibration_text())
    windows = calibration_token_windows(tokenizer, text, job.calibration_tokens, job.window)
    return calibration_activations(dense_model(hf_config, hf_state), windows)


def carve_model_to(job: CarveJob) -> dict:
    """Run the carving (module docstring); return its record (also in ``carve.json``), with
    the wall seconds of each phase: ``read_s`` (model and tokenizer), ``calibration_s``
    (tokenising, the calibration forward), ``clustering_s`` (shared neurons, balanced
    clustering and router fit of every layer), ``construction_s`` (their sum: the carving
    itself) and ``writing_s`` (Megatron checkpoint, run config, HF-style export); ``*_cpu_s``
    the process CPU seconds of each (all threads), with the load average (shared machines)."""
    from transformers import AutoTokenizer

    from megatron_grove.checkpointing import TOKENIZER_DIR
    from megatron_grove.cmoe.carve_model import carve_model, carved_run_config
    from megatron_grove.cmoe.export import (
        write_hf_export,
        write_megatron_checkpoint,
        write_run_config,
    )
    from megatron_grove.hf_conversion.hf_config import grove_config_from_hf
    from megatron_grove.hf_conversion.safetensors_io import copy_tokenizer_files

    spec = job.spec
    output = Path(job.output)
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        marks, cpu = [time.perf_counter()], [time.process_time()]
        tokenizer_dir = tmp / "tokenizer"
        hf_config, hf_state = read_dense(Path(job.model), tokenizer_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        inputs, hidden = calibrate(job, tokenizer, hf_config, hf_state)
        calibration_tokens = inputs[0].shape[0]
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        carved = carve_model(hf_state, hf_config["num_hidden_layers"], inputs, spec,
                             progress=job.progress, hidden=hidden)
        del inputs, hidden
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        write_hf_export(tokenizer_dir, hf_config, hf_state, carved, spec, tmp / "hf")
        dense_cfg = grove_config_from_hf(hf_config, hf_state)
        # the tokenizer is the export's, at its place after the final rename
        cfg = carved_run_config(dense_cfg, spec, job.seq_length, str((output / "hf").resolve()))
        copy_tokenizer_files(tmp / "hf", tmp / "megatron" / TOKENIZER_DIR)  # its own copy
        write_megatron_checkpoint(cfg, dense_cfg, hf_state, carved, tmp / "megatron")
        write_run_config(cfg, tmp / "megatron")
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        seconds = [round(b - a, 2) for a, b in zip(marks, marks[1:])]
        cpu_seconds = [round(b - a, 2) for a, b in zip(cpu, cpu[1:])]
        phases = ("read", "calibration", "clustering", "writing")
        record = {"spec": spec.name, "router": spec.router, "model": str(job.model),
                  "calibration_tokens": calibration_tokens, "window": job.window,
                  "activation_topk": spec.active_neurons(hf_config["intermediate_size"]),
                  "neurons_per_expert": spec.neurons_per_expert(hf_config["intermediate_size"]),
                  **{f"{phase}_s": s for phase, s in zip(phases, seconds)},
                  "construction_s": round(marks[3] - marks[0], 2),
                  **{f"{phase}_cpu_s": s for phase, s in zip(phases, cpu_seconds)},
                  "construction_cpu_s": round(cpu[3] - cpu[0], 2),
                  "threads": torch.get_num_threads(),
                  "load_average_1min": round(os.getloadavg()[0], 2)}
        (tmp / "carve.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(tokenizer_dir)
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
