"""Carving a dense model end to end, whatever the method: read it (HF folder or ``.gguf``),
calibrate on text (one forward capturing every FFN's input and hidden activations), carve every
FFN with the method, write the Megatron checkpoint and its run config (and the method's extra
outputs) into a new folder, built under a temporary name and renamed into place: a failed
carving leaves nothing.

Output folder::

    megatron/   model-only Megatron checkpoint (checkpoint.load=...), its tokenizer/, config.yaml
    hf/         CMoE only: HF-style export (config.json with "cmoe", safetensors, tokenizer)
    carve.json  the carving record: shape, router, calibration, timings of each phase

A method is a shape dataclass implementing :class:`CarvingMethod`
(:class:`~.cmoe.CarveSpec`, :class:`~.grove.GroveCarveSpec`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from megatron_grove.carving.dense_model import calibrate, read_dense
from megatron_grove.carving.export import (
    carved_run_config,
    write_megatron_checkpoint,
    write_run_config,
)
from megatron_grove.carving.spec import Router
from megatron_grove.checkpointing import TOKENIZER_DIR
from megatron_grove.config import MoEConfig
from megatron_grove.hf_conversion.hf_config import grove_config_from_hf

__all__ = ["CarvingMethod", "CarveJob", "carve_layers", "carve_model_to"]


class CarvingMethod(Protocol):
    """What the pipeline needs of a carving method (its shape dataclass)."""

    router: Router

    @property
    def name(self) -> str:
        """The shape's name (``S3A3E8``), for the record and the progress bar."""

    def describe(self, d_ffn: int) -> dict[str, Any]:
        """The shape's fields of the record; raises ValueError for a shape ``d_ffn`` cannot
        take (before the calibration)."""

    def carve_layer(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                    inputs: torch.Tensor, hidden: torch.Tensor | None) -> Any:
        """One FFN (``[d, H]``, ``[d, H]``, ``[H, d]``) from its calibration inputs ``[T, H]``
        and hidden activations ``[T, d]``."""

    def layer_to_megatron(self, carved: Any, prefix: str) -> dict[str, torch.Tensor]:
        """The Megatron state-dict entries of one carved FFN under ``prefix``."""

    def moe_config(self, d_ffn: int) -> MoEConfig:
        """The carved model's ``moe`` config section."""

    def write_extras(self, folder: Path, hf_config: dict, hf_state: dict[str, torch.Tensor],
                     carved: list, tokenizer_dir: Path) -> None:
        """Outputs of this method besides ``megatron/`` (into ``folder``)."""


@dataclass
class CarveJob:
    """One carving (a carving tool's arguments)."""

    model: str  # HF folder or .gguf file
    spec: CarvingMethod
    output: str
    calibration: Optional[str] = None  # text file; None: the embedded training corpus
    calibration_tokens: int = 2048
    window: int = 512
    seq_length: int = 512  # model.seq_length of the written run config
    progress: bool = True


@torch.no_grad()
def carve_layers(spec: CarvingMethod, hf_state: dict[str, torch.Tensor], num_layers: int,
                 inputs: list[torch.Tensor], hidden: list[torch.Tensor] | None = None,
                 progress: bool = True) -> list:
    """Carve ``model.layers.{i}.mlp`` of an HF state dict for every layer ``i`` from its
    calibration ``inputs[i]`` ``[T, H]`` (and ``hidden[i]`` ``[T, d_ffn]``, computed from them
    when not given).

    Runs torch on one thread: the carving is many small operations, whose thread barriers cost
    more than they save (S3A3E8 on SmolLM2, shared 2-core machine: 5.1 CPU-s on one thread,
    19.8 on two)."""
    carved = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in tqdm(range(num_layers), desc=f"carve {spec.name}", unit="layer",
                      disable=not progress):
            mlp = f"model.layers.{i}.mlp."
            carved.append(spec.carve_layer(hf_state[mlp + "gate_proj.weight"],
                                           hf_state[mlp + "up_proj.weight"],
                                           hf_state[mlp + "down_proj.weight"], inputs[i],
                                           None if hidden is None else hidden[i]))
    finally:
        torch.set_num_threads(threads)
    return carved


class _PhaseClock:
    """Wall and process-CPU seconds of named phases, in order."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        self.wall[phase] = time.perf_counter() - wall
        self.cpu[phase] = time.process_time() - cpu

    def record(self, construction: tuple[str, ...]) -> dict[str, float]:
        """``{phase}_s`` and ``{phase}_cpu_s`` of every phase, ``construction_s`` /
        ``construction_cpu_s`` the sums over the ``construction`` phases (rounded to 0.01)."""
        out = {f"{phase}_s": round(s, 2) for phase, s in self.wall.items()}
        out["construction_s"] = round(sum(self.wall[p] for p in construction), 2)
        out.update({f"{phase}_cpu_s": round(s, 2) for phase, s in self.cpu.items()})
        out["construction_cpu_s"] = round(sum(self.cpu[p] for p in construction), 2)
        return out


def carve_model_to(job: CarveJob) -> dict:
    """Run the carving (module docstring); return its record (also in ``carve.json``), with
    the wall seconds of each phase: ``read_s`` (model and tokenizer), ``calibration_s``
    (tokenising, building the dense model, the calibration forward), ``clustering_s`` (the
    method's carving of every layer), ``construction_s`` (their sum: the carving itself) and
    ``writing_s`` (Megatron checkpoint, run config, the method's extras); ``*_cpu_s`` the
    process CPU seconds of each (all threads), with the load average (shared machines)."""
    spec, output = job.spec, Path(job.output)
    tmp = output.parent / f".{output.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir(parents=True)
    try:
        clock = _PhaseClock()
        megatron = tmp / "megatron"
        tokenizer_dir = megatron / TOKENIZER_DIR
        with clock("read"):
            hf_config, hf_state = read_dense(Path(job.model), tokenizer_dir)
            d_ffn = hf_config["intermediate_size"]
            shape = spec.describe(d_ffn)  # a shape the FFN cannot take fails before calibrating
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        with clock("calibration"):
            inputs, hidden = calibrate(tokenizer, job.calibration, job.calibration_tokens,
                                       job.window, hf_config, hf_state)
        with clock("clustering"):
            carved = carve_layers(spec, hf_state, hf_config["num_hidden_layers"], inputs,
                                  hidden, progress=job.progress)
        calibration_tokens = inputs[0].shape[0]
        del inputs, hidden
        with clock("writing"):
            spec.write_extras(tmp, hf_config, hf_state, carved, tokenizer_dir)
            dense_cfg = grove_config_from_hf(hf_config, hf_state)
            # the tokenizer the run config names is the checkpoint's, after the final rename
            cfg = carved_run_config(dense_cfg, spec.moe_config(d_ffn), job.seq_length,
                                    str((output / "megatron" / TOKENIZER_DIR).resolve()))
            write_megatron_checkpoint(cfg, dense_cfg, hf_state, carved, megatron,
                                      to_megatron=spec.layer_to_megatron)
            write_run_config(cfg, megatron)
        record = {"spec": spec.name, "router": spec.router.value, "model": str(job.model),
                  "calibration_tokens": calibration_tokens, "window": job.window, **shape,
                  **clock.record(("read", "calibration", "clustering")),
                  "threads": torch.get_num_threads(),
                  "load_average_1min": round(os.getloadavg()[0], 2)}
        (tmp / "carve.json").write_text(json.dumps(record, indent=2) + "\n")
        os.rename(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record
