"""Carving a dense model into a Grove MoE end to end (``tools/carve_grove.py``): read it (HF
folder or ``.gguf``), calibrate on text (one forward capturing every FFN's input and hidden
activations), carve every FFN (:func:`~megatron_grove.cmoe.grove_model.carve_grove_model`),
write the Megatron checkpoint and its run config into a new folder (built under a temporary
name and renamed into place: a failed carving leaves nothing). The same reading and
calibration as the CMoE carving (:mod:`megatron_grove.cmoe.pipeline`).

Output folder::

    megatron/   model-only Megatron checkpoint (checkpoint.load=...), its tokenizer, config.yaml
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

import torch

from megatron_grove.cmoe.grove_carving import GroveCarveSpec
from megatron_grove.cmoe.pipeline import (
    CarveJob,
    calibrate,
    read_dense,
)

__all__ = ["GroveCarveJob", "carve_grove_model_to"]


@dataclass
class GroveCarveJob(CarveJob):
    """One Grove carving (``tools/carve_grove.py``'s arguments): a :class:`CarveJob` whose
    ``spec`` is a :class:`GroveCarveSpec`."""

    spec: GroveCarveSpec


def carve_grove_model_to(job: GroveCarveJob) -> dict:
    """Run the carving (module docstring); return its record (also in ``carve.json``) with the
    wall seconds of each phase as the CMoE carving's: ``read_s``, ``calibration_s``,
    ``clustering_s`` (shared neurons, groups, adjugates, experts and router of every layer),
    ``construction_s`` (their sum), ``writing_s``; ``*_cpu_s`` the process CPU seconds."""
    from transformers import AutoTokenizer

    from megatron_grove.checkpointing import TOKENIZER_DIR
    from megatron_grove.cmoe.export import write_megatron_checkpoint, write_run_config
    from megatron_grove.cmoe.grove_model import (
        carve_grove_model,
        carved_grove_ffn_to_megatron,
        grove_run_config,
    )
    from megatron_grove.hf_conversion.hf_config import grove_config_from_hf

    spec = job.spec
    output = Path(job.output)
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        marks, cpu = [time.perf_counter()], [time.process_time()]
        megatron = tmp / "megatron"
        tokenizer_dir = megatron / TOKENIZER_DIR
        hf_config, hf_state = read_dense(Path(job.model), tokenizer_dir)
        d_ffn = hf_config["intermediate_size"]
        spec.neurons_per_expert(d_ffn)  # a bad --adjugate-size fails before calibrating
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        inputs, hidden = calibrate(job, tokenizer, hf_config, hf_state)
        calibration_tokens = inputs[0].shape[0]
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        carved = carve_grove_model(hf_state, hf_config["num_hidden_layers"], inputs, spec,
                                   progress=job.progress, hidden=hidden)
        del inputs, hidden
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        dense_cfg = grove_config_from_hf(hf_config, hf_state)
        cfg = grove_run_config(dense_cfg, spec, job.seq_length,
                               str((output / "megatron" / TOKENIZER_DIR).resolve()))
        write_megatron_checkpoint(cfg, dense_cfg, hf_state, carved, megatron,
                                  to_megatron=carved_grove_ffn_to_megatron)
        write_run_config(cfg, megatron)
        marks.append(time.perf_counter())
        cpu.append(time.process_time())
        phases = ("read", "calibration", "clustering", "writing")
        record = {"spec": spec.name, "router": spec.router, "model": str(job.model),
                  "calibration_tokens": calibration_tokens, "window": job.window,
                  "activation_topk": spec.active_neurons(d_ffn),
                  "shared_neurons": spec.shared_neurons(d_ffn),
                  "neurons_per_expert": spec.neurons_per_expert(d_ffn),
                  "adjugate_neurons": spec.adjugate, "adjugate_scale": spec.adjugate_scale,
                  **{f"{phase}_s": round(b - a, 2)
                     for phase, a, b in zip(phases, marks, marks[1:])},
                  "construction_s": round(marks[3] - marks[0], 2),
                  **{f"{phase}_cpu_s": round(b - a, 2)
                     for phase, a, b in zip(phases, cpu, cpu[1:])},
                  "construction_cpu_s": round(cpu[3] - cpu[0], 2),
                  "threads": torch.get_num_threads(),
                  "load_average_1min": round(os.getloadavg()[0], 2)}
        (tmp / "carve.json").write_text(json.dumps(record, indent=2) + "\n")
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
