"""Training checkpoints with Megatron's dist_checkpointing, saved atomically.

Layout under ``checkpoint.save``::

    iter_0000004/                 a complete Megatron distributed checkpoint
        (dist_checkpointing files: model [+ optimizer] sharded tensors, common state)
        rng/rank_00000.pt         each rank's RNG states
        manifest.json             size and CRC-32 of every file above (:mod:`.manifest`)
    latest_checkpointed_iteration.txt
    tokenizer/                    tokenizer.json (+ tokenizer_config.json ...), when known

``common.pt`` holds ``train_state``: ``step``, ``consumed_samples``, ``scheduler`` (None in a
model-only checkpoint, e.g. one converted from Hugging Face) and ``config`` (the whole
:class:`~megatron_grove.config.GroveConfig` as a dict), so that tools rebuild the model from
the checkpoint alone (:func:`read_checkpoint_config`). The tokenizer is the one named by
``config.data.tokenizer`` (None: the shipped tokenizer), copied into ``tokenizer/`` at the
first save; :func:`checkpoint_tokenizer` finds it.

A checkpoint is written to ``.iter_XXXXXXX.tmp`` and renamed into place by rank 0 only after
every rank finished and the manifest is written; ``latest_checkpointed_iteration.txt`` is
replaced atomically after that. An asynchronous save (:func:`save_checkpoint_async`,
:mod:`.async_save`) writes the tensors in a background process and does the manifest, the
rename and the pointer in its finalisation, after every rank's write. A process killed mid-save therefore leaves the previous
checkpoint as the latest loadable one (the stale ``.tmp`` folder is removed by the next save).
Loading checks the manifest first (:func:`verify_checkpoint`): a damaged, truncated or
incomplete checkpoint is a one-line :class:`CheckpointError` naming the file; one saved before
manifests existed loads with a warning. Tensors whose global shape differs from the model's
(another model size) are refused before anything is read, naming the first one.

Because model and optimizer state are Megatron sharded tensors, a checkpoint loads under a
different expert/tensor/pipeline-parallel layout (dist_checkpointing reshards on load; layers
are keyed by their global index). ``model`` is a module or this rank's model chunks.
"""

from __future__ import annotations

import os
import queue
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_grove.checkpointing.folder_kind import not_our_checkpoint
from megatron_grove.checkpointing.manifest import (
    MANIFEST_NAME,
    verify_manifest,
    write_manifest,
)
from megatron_grove.checkpointing.optimizer_state import (
    load_optimizer_state,
    optimizer_skeleton,
    saved_distributed_format,
    sharded_optimizer_state,
)
from megatron_grove.data.tokenizer import copy_tokenizer_files, default_tokenizer_path
from megatron_grove.runtime.distributed import collective_failure, objects_from_all_ranks

__all__ = ["CheckpointError", "TrainState", "save_checkpoint", "save_checkpoint_async",
           "load_checkpoint",
           "latest_iteration", "checkpoint_dir", "checkpoint_steps", "checkpoint_step",
           "remove_checkpoints_after", "resolve_checkpoint_folder", "verify_checkpoint",
           "read_checkpoint_config", "checkpoint_tokenizer", "TOKENIZER_DIR"]

LATEST_FILE = "latest_checkpointed_iteration.txt"
TOKENIZER_DIR = "tokenizer"
_ITER_DIR = re.compile(r"iter_(\d{7,})")
_INTEGRITY = "crc32-manifest"  # train_state["integrity"] of checkpoints that carry a manifest


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


def checkpoint_steps(root: str | Path) -> list[int]:
    """Steps of the published ``iter_*`` folders under ``root``, ascending (no temporary ones)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if p.is_dir() and (m := _ITER_DIR.fullmatch(p.name)))


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


def _modules(model: torch.nn.Module | list[torch.nn.Module]) -> list[torch.nn.Module]:
    """The model (chunks: one per virtual pipeline stage), unwrapped from Megatron's DDP."""
    return [chunk.module if hasattr(chunk, "module") else chunk
            for chunk in (model if isinstance(model, list) else [model])]


def _sharded_state(model: torch.nn.Module | list[torch.nn.Module], optimizer, is_loading: bool,
                   optimizer_format: str) -> dict[str, Any]:
    """Model (and, unless ``optimizer`` is None, optimizer) sharded state dicts. Model chunks
    (virtual pipeline stages) go under ``model`` as ``chunk0``, ``chunk1``...: only the
    sharded tensors' keys reach the files, and those name layers by their global index, so
    the checkpoint does not depend on the pipeline layout."""
    modules = _modules(model)
    model_sd = (modules[0].sharded_state_dict() if len(modules) == 1 else
                {f"chunk{i}": module.sharded_state_dict() for i, module in enumerate(modules)})
    if optimizer is None:
        return {"model": model_sd}
    return {"model": model_sd, "optimizer": sharded_optimizer_state(optimizer, model_sd,
                                                                    is_loading, optimizer_format)}


def _store_tokenizer(root: Path, config: dict[str, Any]) -> None:
    """Copy the run's tokenizer files (those of the folder ``data.tokenizer`` names, or holds)
    into ``root/tokenizer`` once (rank 0)."""
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


def _keep_checkpoint_writes_in_process() -> None:
    """Megatron's ``torch_dist`` writer passes its write results through a queue it creates on
    first use in a ``multiprocessing`` *Manager*: a spawned server process (it imports torch:
    ~760 MB resident) that lives as long as the rank, and outlives it when the rank is killed
    with SIGKILL (torchrun then signals only its live workers' process groups, not the dead
    one's). A synchronous save's writer threads run in this process, so a plain in-process
    queue serves and no helper process is started. Megatron keeps the queue in a module global
    and uses the one set when a save is prepared."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def _begin_save(root: Path, model: torch.nn.Module | list[torch.nn.Module], optimizer,
                state: TrainState,
                optimizer_format: str) -> tuple[Path, Path, dict[str, Any]]:
    """Collective: clear stale temporary folders, create this save's; return (temporary folder,
    final folder, the sharded state dict to write)."""
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
                              "scheduler": state.scheduler, "config": state.config,
                              "integrity": _INTEGRITY}
    if rank == 0:
        tmp.mkdir(parents=True)
    _barrier()
    return tmp, final, sharded


def _save_strategy():
    """Megatron's ``torch_dist`` save strategy wrapped in its ``FullyParallelSaveStrategyWrapper``
    (what its trainer's ``--ckpt-fully-parallel-save`` does): a tensor replicated on several ranks
    (the dense weights and their optimizer state on every data-parallel rank) is written by one
    of them, chosen so that every rank writes about the same number of bytes, instead of always
    by its first replica (rank 0 writing all dense state). The files and what loads from them do
    not change; a save's time, and an asynchronous save's stall, are the busiest rank's."""
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"))


def _save_rng(tmp: Path) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")


def _publish(root: Path, tmp: Path, final: Path, state: TrainState) -> None:
    """Collective, once every rank's files are in ``tmp``: the manifest, then (rank 0) the
    atomic rename to ``final``, the ``latest`` pointer and the tokenizer."""
    _barrier()
    write_manifest(tmp)  # collective; ends once every rank's hashes reached rank 0
    if not dist.is_initialized() or dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f".{LATEST_FILE}.tmp"
        pointer.write_text(str(state.step))
        os.replace(pointer, root / LATEST_FILE)
        _store_tokenizer(root, state.config)
    _barrier()


def save_checkpoint(root: str | Path, model: torch.nn.Module | list[torch.nn.Module], optimizer,
                    state: TrainState, optimizer_format: str = "fully_reshardable") -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. ``optimizer``
    None writes a model-only checkpoint (``state.scheduler`` should then be None).
    ``optimizer_format``: the distributed optimizer's format (``checkpoint.optimizer_format``).
    The folder gets a ``manifest.json`` (size and CRC-32 of every file) before it is published."""
    _keep_checkpoint_writes_in_process()
    root = Path(root)
    tmp, final, sharded = _begin_save(root, model, optimizer, state, optimizer_format)
    dist_checkpointing.save(sharded, str(tmp), _save_strategy())
    _save_rng(tmp)
    _publish(root, tmp, final, state)
    return final


def save_checkpoint_async(root: str | Path, model: torch.nn.Module | list[torch.nn.Module],
                          optimizer, state: TrainState, optimizer_format: str = "fully_reshardable"):
    """Collective: prepare the save of ``state.step`` and return Megatron's ``AsyncRequest``
    whose call writes the tensors (to be scheduled on an ``AsyncCallsQueue``; see
    :mod:`.async_save`). Written now, synchronously: the common state (rank 0) and each rank's
    RNG file. The request's finalisation, run on every rank once every rank's write has
    finished, writes Megatron's metadata, then the manifest, and only then renames the folder
    into place and moves the ``latest`` pointer (:func:`_publish`): until then the previous
    checkpoint stays the latest, whatever happens to the write."""
    from megatron_grove.checkpointing.async_save import cross_process_write_results

    cross_process_write_results()
    root = Path(root)
    tmp, final, sharded = _begin_save(root, model, optimizer, state, optimizer_format)
    request = dist_checkpointing.save(sharded, str(tmp), _save_strategy(), async_sharded_save=True,
                                      async_strategy="mcore")
    _save_rng(tmp)
    request.add_finalize_fn(lambda: _publish(root, tmp, final, state))
    return request


def resolve_checkpoint_folder(path: str | Path, step: int | None = None) -> Path:
    """A checkpoint root (with ``latest_checkpointed_iteration.txt``) -> its latest (or
    ``step``) ``iter_*`` folder; an ``iter_*`` folder itself is returned as is."""
    path = Path(path)
    if (path / "metadata.json").is_file() and step is None:
        return path
    step = latest_iteration(path) if step is None else step
    if step is None:
        raise CheckpointError(not_our_checkpoint(path, LATEST_FILE))
    return checkpoint_dir(path, step)


def _unreadable(folder: Path, exc: BaseException) -> CheckpointError:
    """A one-line CheckpointError for a checkpoint Megatron could not read."""
    first = next(iter(str(exc).strip().splitlines()), "")
    if first.startswith("CheckpointException ranks:"):  # torch's summary: show a rank's error
        lines = [line for line in str(exc).splitlines() if line and not line.startswith(" ")]
        first = lines[-1] if lines else first
    return CheckpointError(f"{folder}: cannot be read ({type(exc).__name__}: {first[:300]}); "
                           "the checkpoint is damaged or incomplete")


def _reading(folder: Path, read):
    """``read()`` with Megatron's and torch's checkpoint errors (torch's is a
    BaseException) turned into a one-line :class:`CheckpointError`; failed collectives and
    interrupts pass through."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return read()
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as exc:
        if collective_failure(exc) is not None:
            raise
        raise _unreadable(folder, exc) from None


def _common_state(folder: Path) -> dict[str, Any]:
    """The checkpoint's plain (non-sharded) state: ``train_state`` and the optimizer's."""
    if not (folder / "metadata.json").is_file():
        raise CheckpointError(f"{folder}: no metadata.json; not a Megatron distributed "
                              "checkpoint, or an incomplete one")
    common = _reading(folder, lambda: dist_checkpointing.load_common_state_dict(str(folder)))
    if "train_state" not in common:
        raise CheckpointError(f"{folder}: no train_state in the checkpoint's common state; the "
                              "checkpoint is not ours")
    return common


def verify_checkpoint(folder: str | Path) -> str | None:
    """Collective: check the checkpoint folder ``folder`` (an ``iter_*`` folder) against its
    manifest, each rank a share of the files. Raises :class:`CheckpointError` naming the first
    damaged, truncated or missing file; returns None when every file matches, or a warning
    for a checkpoint saved before manifests existed (which then loads unverified)."""
    folder = Path(folder)
    problems = verify_manifest(folder)
    if not problems:
        return None
    if [(p.name, p.what) for p in problems] == [(MANIFEST_NAME, "missing")]:
        if _common_state(folder)["train_state"].get("integrity") != _INTEGRITY:
            return (f"{folder} has no {MANIFEST_NAME} (saved before checkpoints carried "
                    "checksums): loading it unverified")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    raise CheckpointError(f"{folder / problems[0].name}: {problems[0].what}{more}; the "
                          "checkpoint is damaged or incomplete")


def _check_model_shapes(folder: Path, model_sd: dict[str, Any]) -> None:
    """Collective: every model tensor must exist in the checkpoint with the same global shape;
    else the first mismatch (the same on every rank) is a CheckpointError naming both shapes."""
    saved = _reading(folder, lambda: dist_checkpointing.load_tensors_metadata(str(folder)))
    local = None
    for tensor in nested_values(model_sd):
        if not isinstance(tensor, ShardedTensor):
            continue
        if tensor.key not in saved:
            local = (f"{folder}: model tensor {tensor.key} {tuple(tensor.global_shape)} is not in "
                     "the checkpoint; it was saved from another model (compare the model.* and "
                     "moe.* keys with the checkpoint's config)")
        elif tuple(saved[tensor.key].global_shape) != tuple(tensor.global_shape):
            local = (f"{folder}: {tensor.key} has shape {tuple(saved[tensor.key].global_shape)} "
                     f"in the checkpoint and {tuple(tensor.global_shape)} in this run's model; "
                     "the checkpoint is of another model size (compare the model.* and moe.* "
                     "keys with the checkpoint's config)")
        if local:
            break
    first = next((m for m in objects_from_all_ranks(local) if m), None)
    if first:
        raise CheckpointError(first)


def checkpoint_step(folder: str | Path) -> int:
    """The training step stored in the checkpoint folder ``folder`` (0: model-only)."""
    train = _common_state(Path(folder))["train_state"]
    return train["step"] if train["scheduler"] is not None else 0


def remove_checkpoints_after(root: str | Path, step: int) -> list[int]:
    """Delete the ``iter_*`` folders under ``root`` newer than ``step`` (rank 0 only; the
    others must not touch ``root`` meanwhile) and point ``latest_checkpointed_iteration.txt``
    at the newest one left (removed when none is). Returns the steps removed."""
    root = Path(root)
    removed = [s for s in checkpoint_steps(root) if s > step]
    if removed:  # the pointer first: a crash in between leaves no pointer at a missing folder
        left = [s for s in checkpoint_steps(root) if s <= step]
        pointer = root / LATEST_FILE
        if left:
            tmp = root / f".{LATEST_FILE}.tmp"
            tmp.write_text(str(left[-1]))
            os.replace(tmp, pointer)
        else:
            pointer.unlink(missing_ok=True)
    for s in removed:
        shutil.rmtree(checkpoint_dir(root, s))
    return removed


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


def load_checkpoint(root: str | Path, model: torch.nn.Module | list[torch.nn.Module], optimizer,
                    step: int | None = None, verify: bool = True) -> TrainState:
    """Collective: load model, optimizer, RNG and train state from the latest (or ``step``)
    checkpoint under ``root``. Works under a different TP/EP/PP layout than the one saved; the
    RNG states are restored only when the world size is unchanged. A model-only checkpoint (e.g.
    converted from Hugging Face, or ``optimizer`` None) loads the model only and returns step 0
    with ``scheduler`` None: training starts from those weights. ``verify=False`` skips the
    manifest check (for a folder the caller has just verified)."""
    folder = resolve_checkpoint_folder(root, step)
    if verify:
        warning = verify_checkpoint(folder)
        if warning and (not dist.is_initialized() or dist.get_rank() == 0):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
    saved = _common_state(folder)
    train = saved["train_state"]
    if train["scheduler"] is None:
        optimizer = None
    optimizer_format = saved_distributed_format(saved.get("optimizer"))
    if optimizer is not None and optimizer_format == "dp_reshardable":
        _check_same_layout(folder, train["config"])
    sharded = _sharded_state(model, optimizer, is_loading=True,
                             optimizer_format=optimizer_format or "fully_reshardable")
    _check_model_shapes(folder, sharded["model"])
    skeleton = optimizer_skeleton(sharded.get("optimizer"))
    loaded = _reading(folder, lambda: dist_checkpointing.load(sharded, str(folder)))
    modules = _modules(model)
    if len(modules) == 1:
        modules[0].load_state_dict(loaded["model"])
    for i, module in enumerate(modules if len(modules) > 1 else []):
        module.load_state_dict(loaded["model"][f"chunk{i}"])
    if optimizer is None:
        return TrainState(step=0, consumed_samples=0, scheduler=None, config=train["config"])
    load_optimizer_state(optimizer, skeleton, loaded["optimizer"], saved["optimizer"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    rng_file = folder / "rng" / f"rank_{rank:05d}.pt"
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rng_file.is_file() and len(list((folder / "rng").glob("rank_*.pt"))) == world:
        _set_rng_state(_reading(folder, lambda: torch.load(rng_file, weights_only=False)))
    return TrainState(step=train["step"], consumed_samples=train["consumed_samples"],
                      scheduler=train["scheduler"], config=train["config"])
