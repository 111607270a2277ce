"""Training checkpoints with Megatron's dist_checkpointing, saved atomically.

Layout under ``checkpoint.save``::

    iter_0000004/                 a complete Megatron distributed checkpoint
        (dist_checkpointing files: model [+ optimizer] sharded tensors, common.pt)
        rng/rank_00000.pt         each rank's RNG states
    latest_checkpointed_iteration.txt
    tokenizer/                    tokenizer.json (+ tokenizer_config.json ...), when known

``common.pt`` holds ``train_state``: ``step``, ``consumed_samples``, ``scheduler`` (None in a
model-only checkpoint, e.g. one converted from Hugging Face) and ``config`` (the whole
:class:`~megatron_grove.config.GroveConfig` as a dict), so that tools rebuild the model from
the checkpoint alone (:func:`read_checkpoint_config`). The tokenizer is the one named by
``config.data.tokenizer`` (None: the shipped tokenizer), copied into ``tokenizer/`` at the
first save; :func:`checkpoint_tokenizer` finds it.

A checkpoint is written to ``.iter_XXXXXXX.tmp`` and renamed into place by rank 0 only after
every rank finished; ``latest_checkpointed_iteration.txt`` is replaced atomically after that.
A process killed mid-save therefore leaves the previous checkpoint as the latest loadable one
(the stale ``.tmp`` folder is removed by the next save).

Because model and optimizer state are Megatron sharded tensors, a checkpoint loads under a
different expert/tensor-parallel layout (dist_checkpointing reshards on load).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_grove.checkpointing.optimizer_state import (
    load_optimizer_state,
    optimizer_skeleton,
    saved_distributed_format,
    sharded_optimizer_state,
)

__all__ = ["CheckpointError", "TrainState", "save_checkpoint", "load_checkpoint",
           "latest_iteration", "checkpoint_dir", "resolve_checkpoint_folder",
           "read_checkpoint_config", "checkpoint_tokenizer", "TOKENIZER_DIR"]

LATEST_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, partial, or cannot load as asked."""


@dataclass
class TrainState:
    """Everything besides model/optimizer tensors that a resumed run needs."""

    step: int
    consumed_samples: int
    scheduler: dict[str, Any]
    config: dict[str, Any]


def checkpoint_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"iter_{step:07d}"


def latest_iteration(root: str | Path) -> int | None:
    """The step of the newest complete checkpoint under ``root`` (None if there is none)."""
    path = Path(root) / LATEST_FILE
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit() or not checkpoint_dir(root, int(text)).is_dir():
        raise CheckpointError(f"{path} names iteration {text!r}, which has no checkpoint "
                              f"folder; the checkpoint root {root} is damaged")
    return int(text)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
            "tracker": _tracker().get_states()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])
    _tracker().set_states(state["tracker"])


def _tracker():
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def _sharded_state(model: torch.nn.Module, optimizer, is_loading: bool,
                   optimizer_format: str) -> dict[str, Any]:
    """Model (and, unless ``optimizer`` is None, optimizer) sharded state dicts."""
    module = model.module if hasattr(model, "module") else model
    model_sd = module.sharded_state_dict()
    if optimizer is None:
        return {"model": model_sd}
    return {"model": model_sd, "optimizer": sharded_optimizer_state(optimizer, model_sd,
                                                                    is_loading, optimizer_format)}


def _store_tokenizer(root: Path, config: dict[str, Any]) -> None:
    """Copy the run's tokenizer files (those of the folder ``data.tokenizer`` names, or holds)
    into ``root/tokenizer`` once (rank 0)."""
    from megatron_grove.data.tokenizer import default_tokenizer_path
    from megatron_grove.hf_conversion.safetensors_io import copy_tokenizer_files

    target = root / TOKENIZER_DIR
    if target.exists():
        return
    source = Path((config.get("data") or {}).get("tokenizer") or default_tokenizer_path())
    tmp = root / f".{TOKENIZER_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    copy_tokenizer_files(source if source.is_dir() else source.parent, tmp)
    os.replace(tmp, target)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(root: str | Path, model: torch.nn.Module, optimizer, state: TrainState,
                    optimizer_format: str = "fully_reshardable") -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. ``optimizer``
    None writes a model-only checkpoint (``state.scheduler`` should then be None).
    ``optimizer_format``: the distributed optimizer's format (``checkpoint.optimizer_format``)."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = checkpoint_dir(root, state.step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".iter_*.tmp"):
            shutil.rmtree(stale)
    _barrier()
    sharded = _sharded_state(model, optimizer, is_loading=False, optimizer_format=optimizer_format)
    sharded["train_state"] = {"step": state.step, "consumed_samples": state.consumed_samples,
                              "scheduler": state.scheduler, "config": state.config}
    if rank == 0:
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(sharded, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST_FILE}.tmp"
        pointer.write_text(str(state.step))
        os.replace(pointer, root / LATEST_FILE)
        _store_tokenizer(root, state.config)
    _barrier()
    return final


def resolve_checkpoint_folder(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint root (with ``latest_checkpointed_iteration.txt``) -> its latest (or
    ``step``) ``iter_*`` folder; an ``iter_*`` folder itself is returned as is."""
    path = Path(path)
    if (path / "metadata.json").is_file() and step is None:
        return path
    step = latest_iteration(path) if step is None else step
    if step is None:
        raise CheckpointError(
            f"{path}: no {LATEST_FILE} there; not a checkpoint written by checkpoint.save or "
            "tools/convert_checkpoint.py")
    return checkpoint_dir(path, step)


def _common_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's plain (non-sharded) state: ``train_state`` and the optimizer's."""
    try:
        common = dist_checkpointing.load_common_state_dict(str(folder))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{folder}: no common state ({exc}); the checkpoint is partial or "
                              "not ours") from None
    if "train_state" not in common:
        raise CheckpointError(f"{folder}: no train_state in the checkpoint's common state; the "
                              "checkpoint is not ours")
    return common


def read_checkpoint_config(path: str | Path) -> dict[str, Any]:
    """The run config (a :func:`~megatron_grove.config.config_to_dict` dict) stored in the
    checkpoint at ``path`` (root or ``iter_*`` folder)."""
    return _common_state(resolve_checkpoint_folder(path))["train_state"]["config"]


def checkpoint_tokenizer(path: str | Path) -> str | None:
    """The tokenizer folder of the checkpoint root ``path`` (or of an ``iter_*`` folder's
    parent); None when the checkpoint carries none."""
    path = Path(path)
    for candidate in (path / TOKENIZER_DIR, path.parent / TOKENIZER_DIR):
        if (candidate / "tokenizer.json").is_file():
            return str(candidate)
    return None


def _check_same_layout(folder: Path, config: dict[str, Any]) -> None:
    """A "dp_reshardable" distributed-optimizer checkpoint loads only at its TP/EP sizes."""
    from megatron.core import parallel_state

    saved = config["parallel"]
    saved_layout = (saved["tensor_model_parallel_size"], saved["expert_model_parallel_size"])
    layout = (parallel_state.get_tensor_model_parallel_world_size(),
              parallel_state.get_expert_model_parallel_world_size())
    if layout != saved_layout:
        raise CheckpointError(
            f"{folder}: its distributed-optimizer state was saved with "
            f"checkpoint.optimizer_format=dp_reshardable at TP={saved_layout[0]}, "
            f"EP={saved_layout[1]} and loads only at those sizes (this run: TP={layout[0]}, "
            f"EP={layout[1]}); resume at the saved layout (a later save with "
            "checkpoint.optimizer_format=fully_reshardable can then change it)")


def load_checkpoint(root: str | Path, model: torch.nn.Module, optimizer,
                    step: int | None = None) -> TrainState:
    """Collective: load model, optimizer, RNG and train state from the latest (or ``step``)
    checkpoint under ``root``. Works under a different TP/EP layout than the one saved; the RNG
    states are restored only when the world size is unchanged. A model-only checkpoint (e.g.
    converted from Hugging Face, or ``optimizer`` None) loads the model only and returns step 0
    with ``scheduler`` None: training starts from those weights."""
    folder = resolve_checkpoint_folder(root, step)
    saved = _common_state(folder)
    train = saved["train_state"]
    if train["scheduler"] is None:
        optimizer = None
    optimizer_format = saved_distributed_format(saved.get("optimizer"))
    if optimizer is not None and optimizer_format == "dp_reshardable":
        _check_same_layout(folder, train["config"])
    sharded = _sharded_state(model, optimizer, is_loading=True,
                             optimizer_format=optimizer_format or "fully_reshardable")
    skeleton = optimizer_skeleton(sharded.get("optimizer"))
    loaded = dist_checkpointing.load(sharded, str(folder))
    module = model.module if hasattr(model, "module") else model
    module.load_state_dict(loaded["model"])
    if optimizer is None:
        return TrainState(step=0, consumed_samples=0, scheduler=None, config=train["config"])
    load_optimizer_state(optimizer, skeleton, loaded["optimizer"], saved["optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = folder / "rng" / f"rank_{rank:05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rng_file.is_file() and len(list((folder / "rng").glob("rank_*.pt"))) == world:
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return TrainState(step=train["step"], consumed_samples=train["consumed_samples"],
                      scheduler=train["scheduler"], config=train["config"])

