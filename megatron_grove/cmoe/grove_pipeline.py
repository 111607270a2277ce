"""Carving a dense model into a Grove MoE end to end (``tools/carve_grove.py``): read it (HF
folder or ``.gguf``), calibrate on text, carve every FFN
(:func:`~megatron_grove.cmoe.grove_model.carve_grove_model`), write the Megatron checkpoint and
its run config into a new folder (built under a temporary name and renamed into place: a failed
carving leaves nothing).

Output folder::

    megatron/   model-only Megatron checkpoint (checkpoint.load=...), its tokenizer, config.yaml
    carve.json  the carving record: shape, calibration, timings
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
    calibration_token_windows,
    default_calibration_text,
)

__all__ = ["GroveCarveJob", "carve_grove_model_to"]


@dataclass
class GroveCarveJob(CarveJob):
    """One Grove carving (``tools/carve_grove.py``'s arguments): a :class:`CarveJob` whose
    ``spec`` is a :class:`GroveCarveSpec`."""

    spec: GroveCarveSpec


def carve_grove_model_to(job: GroveCarveJob) -> dict:
    """Run the carving (module docstring); return its record (also in ``carve.json``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_grove.checkpointing import TOKENIZER_DIR
    from megatron_grove.cmoe.carve_model import calibration_inputs
    from megatron_grove.cmoe.export import write_megatron_checkpoint, write_run_config
    from megatron_grove.cmoe.gguf import gguf_to_hf_dir
    from megatron_grove.cmoe.grove_model import (
        carve_grove_model,
        carved_grove_ffn_to_megatron,
        grove_run_config,
    )
    from megatron_grove.hf_conversion.hf_config import grove_config_from_hf
    from megatron_grove.hf_conversion.safetensors_io import (
        HFTensors,
        copy_tokenizer_files,
        read_hf_config,
    )

    spec = job.spec
    output = Path(job.output)
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        began = time.perf_counter()
        hf_dir = Path(job.model)
        if hf_dir.suffix == ".gguf":
            hf_dir = gguf_to_hf_dir(hf_dir, tmp / "dense_from_gguf")
        hf_config = read_hf_config(hf_dir)
        d_ffn = hf_config["intermediate_size"]
        spec.neurons_per_expert(d_ffn)  # a bad --adjugate-size fails before calibrating
        with HFTensors(hf_dir) as tensors:
            hf_state = {name: tensors[name].float() for name in tensors}
        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
        text = (Path(job.calibration).read_text() if job.calibration
                else default_calibration_text())
        windows = calibration_token_windows(tokenizer, text, job.calibration_tokens, job.window)
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        inputs = calibration_inputs(model, windows)
        del model
        calibrated = time.perf_counter()
        carved = carve_grove_model(hf_state, hf_config["num_hidden_layers"], inputs, spec,
                                   progress=job.progress)
        clustered = time.perf_counter()
        dense_cfg = grove_config_from_hf(hf_config, hf_state)
        megatron = tmp / "megatron"
        cfg = grove_run_config(dense_cfg, spec, job.seq_length,
                               str((output / "megatron" / TOKENIZER_DIR).resolve()))
        copy_tokenizer_files(hf_dir, megatron / TOKENIZER_DIR)
        write_megatron_checkpoint(cfg, dense_cfg, hf_state, carved, megatron,
                                  to_megatron=carved_grove_ffn_to_megatron)
        write_run_config(cfg, megatron)
        written = time.perf_counter()
        record = {"spec": spec.name, "model": str(job.model),
                  "calibration_tokens": int(windows.numel()), "window": job.window,
                  "activation_topk": spec.active_neurons(d_ffn),
                  "shared_neurons": spec.shared_neurons(d_ffn),
                  "neurons_per_expert": spec.neurons_per_expert(d_ffn),
                  "adjugate_neurons": spec.adjugate, "adjugate_scale": spec.adjugate_scale,
                  "calibration_s": round(calibrated - began, 2),
                  "clustering_s": round(clustered - calibrated, 2),
                  "writing_s": round(written - clustered, 2),
                  "construction_s": round(clustered - began, 2)}
        (tmp / "carve.json").write_text(json.dumps(record, indent=2) + "\n")
        shutil.rmtree(tmp / "dense_from_gguf", ignore_errors=True)  # the .gguf's dense HF copy
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
