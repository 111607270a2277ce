"""Where a run starts (its own checkpoints, ``checkpoint.load``, or scratch) and how it saves.

The rule (as torchtitan's, whose ``checkpoint.initial_load_path`` is ignored once the run's own
checkpoint folder holds a checkpoint): **a run whose ``checkpoint.save`` already holds
checkpoints resumes from the newest one that verifies**, whatever ``checkpoint.load`` says, so
re-submitting the same command (a requeue, a crash, a preemption) continues the run and never
moves its latest checkpoint backwards. ``checkpoint.load`` (a folder or a converted/carved
model) is where a *new* run starts; ``checkpoint.load: auto`` (or null) starts a new run from
scratch. Checkpoints that fail verification are skipped, each named with the reason; when
none verifies the run refuses to start. ``checkpoint.overwrite: true`` starts from
``checkpoint.load`` (or scratch) anyway and first deletes the checkpoints in
``checkpoint.save`` newer than the starting step, so ``auto`` and the latest pointer follow
the new run; that is also how to roll back, e.g. ``checkpoint.load=SAVE/iter_0000400
checkpoint.overwrite=true``.

Loading (:func:`load_start`) refuses a checkpoint whose weights are not all finite, and
saving (:func:`save_step`) refuses to write non-finite weights and reports a full disk in one
line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from megatron_grove.checkpointing import (
    CheckpointError,
    TrainState,
    checkpoint_dir,
    checkpoint_step,
    checkpoint_steps,
    load_checkpoint,
    remove_checkpoints_after,
    resolve_checkpoint_folder,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_grove.checkpointing.async_save import AsyncCheckpointSaver
from megatron_grove.config import GroveConfig, config_to_dict, routing_differences
from megatron_grove.runtime.distributed import (
    collective_failure,
    disk_full,
    object_from_rank0,
)
from megatron_grove.training.nonfinite import NonFiniteError, first_nonfinite_weight

__all__ = ["StartPoint", "choose_start", "load_start", "save_step", "publish_saves",
           "latest_checkpoint", "check_resume_routing"]


@dataclass
class StartPoint:
    """The checkpoint folder to load (None: fresh initialisation), already verified; whether it
    is one of this run's own (in ``checkpoint.save``); the lines rank 0 prints about the
    choice."""

    folder: Path | None
    own: bool = False
    notes: list[str] = field(default_factory=list)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _same(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _resume_own(save: str, steps: list[int], load: str | None) -> StartPoint:
    skipped: list[str] = []
    for step in reversed(steps):
        folder = checkpoint_dir(save, step)
        try:
            warning = verify_checkpoint(folder)  # collective: the same outcome on every rank
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        notes = [f"resuming: skipped {why}" for why in skipped]
        if warning:
            notes.append(f"warning: {warning}")
        if load not in (None, "auto") and not _same(load, save):
            notes.append(f"checkpoint.load={load} is not used: checkpoint.save={save} holds this "
                         f"run's step {step}, which it resumes (to start from checkpoint.load "
                         "instead, set checkpoint.overwrite=true)")
        return StartPoint(folder, own=True, notes=notes)
    raise CheckpointError(
        f"checkpoint.save={save} holds checkpoints (steps {', '.join(map(str, steps))}) but none "
        f"verifies (newest: {skipped[0]}); set checkpoint.overwrite=true to start over there, "
        "or choose another checkpoint.save")


def choose_start(cfg: GroveConfig) -> StartPoint:
    """Collective: decide (and verify) where this run starts; with ``checkpoint.overwrite``
    also delete the newer checkpoints (rank 0). Raises :class:`CheckpointError` (one line)
    when the checkpoint to start from is missing or damaged."""
    save, load, overwrite = cfg.checkpoint.save, cfg.checkpoint.load, cfg.checkpoint.overwrite
    steps = object_from_rank0(checkpoint_steps(save) if save else [])
    if steps and not overwrite:
        return _resume_own(save, steps, load)
    start = StartPoint(None)
    if load not in (None, "auto") and not (save and _same(load, save)):
        start.folder = resolve_checkpoint_folder(load)
        start.own = bool(save) and _same(start.folder.parent, save)
        warning = verify_checkpoint(start.folder)
        if warning:
            start.notes.append(f"warning: {warning}")
    if steps:  # overwrite
        first = checkpoint_step(start.folder) if start.folder else 0
        removed = object_from_rank0(remove_checkpoints_after(save, first)
                                    if not dist.is_initialized() or dist.get_rank() == 0 else None)
        _barrier()
        if removed:
            start.notes.append(f"checkpoint.overwrite=true: deleted the checkpoints of steps "
                               f"{', '.join(map(str, removed))} from {save}")
    return start


def check_resume_routing(load: str | Path, state: TrainState, cfg: GroveConfig,
                         is_first: bool) -> None:
    """The routing choices (score function, norm_topk_prob, bias in selection) decide what the
    loaded weights compute: a resumed run must keep the checkpoint's; a run that only starts
    from a model-only checkpoint may change them, and says so."""
    differences = routing_differences(state.config, cfg)
    if not differences:
        return
    if state.scheduler is not None:
        raise CheckpointError(
            f"checkpoint.load={load}: this run routes differently from the run it resumes: "
            f"{', '.join(differences)}; set those keys to the checkpoint's values (start from a "
            "model-only checkpoint, e.g. tools/convert_checkpoint.py's output, to change them)")
    if is_first:
        print(f"note: starting from the model-only checkpoint {load} with other routing than it "
              f"was saved with: {', '.join(differences)}", flush=True)


def load_start(start: StartPoint, model, optimizer, scheduler, cfg: GroveConfig,
               is_first: bool) -> tuple[int, int | None]:
    """Collective: load ``start.folder`` (if any) into model, optimizer and LR schedule.
    Returns (the step training continues after, the step of the latest checkpoint in
    ``checkpoint.save`` or None); refuses non-finite weights and other routing than the run it
    resumes (:func:`check_resume_routing`) with a :class:`CheckpointError`."""
    if start.folder is None:
        return 0, None
    state = load_checkpoint(start.folder, model, optimizer, verify=False)  # choose_start did
    check_resume_routing(start.folder, state, cfg, is_first)
    bad = first_nonfinite_weight(model)
    if bad:
        raise CheckpointError(f"{start.folder}: weight {bad} is non-finite; start from an "
                              "earlier checkpoint (checkpoint.load=ITS_FOLDER "
                              "checkpoint.overwrite=true)")
    if state.scheduler is None:  # a model-only checkpoint: training starts from its weights
        return 0, None
    scheduler.load_state_dict(state.scheduler)
    return state.step, state.step if start.own else None


def latest_checkpoint(cfg: GroveConfig, step: int | None) -> str:
    """Which checkpoint a stop now leaves as the latest, in words."""
    if not cfg.checkpoint.save:
        return "checkpoint.save is not set"
    if step is None:
        return f"no checkpoint in {cfg.checkpoint.save} yet"
    return f"the latest checkpoint is step {step} in {cfg.checkpoint.save}"


def _save_failed(cfg: GroveConfig, step: int, exc: BaseException, latest: str) -> BaseException:
    """The one-line :class:`CheckpointError` for a failed save of ``step`` (interrupts and
    failed collectives are returned as they are, to be re-raised)."""
    if isinstance(exc, KeyboardInterrupt) or collective_failure(exc) is not None:
        return exc
    first = next(iter(str(exc).strip().splitlines()), "")
    why = disk_full(exc, cfg.checkpoint.save) or f"{type(exc).__name__}: {first[:200]}"
    return CheckpointError(f"checkpoint.save: saving step {step} failed: {why} ({latest}); "
                           "fix that, then run the same command to resume")


def save_step(cfg: GroveConfig, model, optimizer, scheduler, step: int, latest: str,
              saver: AsyncCheckpointSaver | None = None) -> None:
    """Collective: save step ``step`` to ``checkpoint.save`` (with ``saver``: start its
    asynchronous save, published later by :func:`publish_saves`). Non-finite weights are a
    :class:`NonFiniteError` (nothing written); a failed write a one-line
    :class:`CheckpointError` (a full disk says so and where). ``latest``:
    :func:`latest_checkpoint` before this save."""
    bad = first_nonfinite_weight(model)
    if bad:
        raise NonFiniteError(f"step {step}: weight {bad} is non-finite; not saving it ({latest}); "
                             "lower train.lr or check the data, then resume")
    state = TrainState(step=step, consumed_samples=step * cfg.train.global_batch_size,
                       scheduler=scheduler.state_dict(), config=config_to_dict(cfg))
    try:
        if saver is None:
            save_checkpoint(cfg.checkpoint.save, model, optimizer, state,
                            optimizer_format=cfg.checkpoint.optimizer_format)
        else:
            saver.save(cfg.checkpoint.save, model, optimizer, state,
                       cfg.checkpoint.optimizer_format)
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        raise _save_failed(cfg, step, exc, latest) from None


def publish_saves(cfg: GroveConfig, saver: AsyncCheckpointSaver, wait: bool,
                  latest: str) -> int | None:
    """Collective: publish the asynchronous save in flight once every rank has written it
    (``wait``: block until then). Returns the step published now, or None; a failed write is
    the one-line :class:`CheckpointError` of :func:`save_step`."""
    step = saver.pending_step
    try:
        return saver.wait() if wait else saver.poll()
    except BaseException as exc:
        raise _save_failed(cfg, step, exc, latest) from None
