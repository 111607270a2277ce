"""The pretraining loop: the schedule of steps around :func:`~.step.train_step`.

One step = one global batch of ``train.global_batch_size`` sequences: each data-parallel rank
takes its contiguous slice, split into micro-batches of ``train.micro_batch_size``. The
samples of step ``s`` are fixed by the step number alone, so a resumed run sees exactly the
data an uninterrupted run would (:mod:`.data`). Around each step the loop runs validation
(:mod:`.validation`), computes the throughput figures (:mod:`.flops`), logs the step
(:mod:`.metrics`, progress bar), counts skipped steps, saves checkpoints and stops.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from megatron_grove.checkpointing.async_save import AsyncCheckpointSaver, print_on_rank0
from megatron_grove.config import GroveConfig
from megatron_grove.runtime import initialize_parallel
from megatron_grove.runtime.watchdog import HangWatchdog
from megatron_grove.training.flops import peak_tflops, throughput_record
from megatron_grove.training.loss import reduce_step_loss
from megatron_grove.training.metrics import MetricsWriter
from megatron_grove.training.nonfinite import SkipCounter
from megatron_grove.training.preemption import Preempted, StopSignals
from megatron_grove.training.preflight import preflight
from megatron_grove.training.resume import (
    choose_start,
    latest_checkpoint,
    load_start,
    publish_saves,
    save_step,
)
from megatron_grove.training.setup import TrainingSetup, setup_training
from megatron_grove.training.step import StepResult, forward_step_func, train_step
from megatron_grove.training.stragglers import StragglerDetector, straggler_line
from megatron_grove.training.validation import (
    validation_due,
    validation_line,
    validation_loss,
    validation_record,
)

__all__ = ["TrainSummary", "train"]


@dataclass
class TrainSummary:
    """What :func:`train` did: steps run by this call, first and last finite losses, steps
    skipped as non-finite, the step of its last checkpoint (None: it saved none) and the
    record of its last validation (None: none ran)."""

    steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    skipped: int = 0
    last_saved: int | None = None
    last_validation: dict[str, Any] | None = None

    def count(self, loss: float) -> None:
        self.steps += 1
        if math.isfinite(loss):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss


def _step_record(cfg: GroveConfig, setup: TrainingSetup, step: int, result: StepResult,
                 peak: float | None) -> dict[str, Any]:
    """The metrics record of one step (before validation)."""
    return {
        "step": step, "loss": result.loss,
        "lr": setup.scheduler.get_lr(setup.optimizer.param_groups[0]),
        "grad_norm": result.grad_norm, "step_time_s": result.elapsed_s,
        "skipped": not result.health.finite, "loss_tokens": result.loss_tokens,
        **throughput_record(cfg, setup.padded_vocab_size, result.counters, result.elapsed_s,
                            setup.runtime.world_size, peak),
        "expert_load": result.expert_load, **result.counters,
    }


def _postfix(record: dict[str, Any]) -> dict[str, str]:
    """The progress bar's figures for a step's record."""
    return {"loss": f"{record['loss']:.4f}", "lr": f"{record['lr']:.2e}",
            "tok_s": f"{record['tokens_per_s']:.0f}",
            "tflops": f"{record['tflops_per_device']:.3g}",
            **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {})}


def _start(cfg: GroveConfig) -> tuple[TrainingSetup, int, int | None]:
    """Collective: parallel groups, pre-flight, the run built and resumed -> (setup, the step
    training continues after, the step of the latest own checkpoint or None)."""
    p, t = cfg.parallel, cfg.train
    runtime = initialize_parallel(p.tensor_model_parallel_size, p.expert_model_parallel_size,
                                  p.pipeline_model_parallel_size, seed=t.seed,
                                  virtual_pipeline=p.virtual_pipeline_model_parallel_size,
                                  device=cfg.runtime.device, timeout_s=cfg.runtime.dist_timeout_s,
                                  ranks_per_node=p.ranks_per_node,
                                  expert_tensor_parallel=p.expert_tensor_parallel_size,
                                  context_parallel=p.context_parallel_size)
    is_first = runtime.rank == 0
    preflight(cfg, runtime.rank)
    start_point = choose_start(cfg)
    for note in start_point.notes if is_first else []:
        print(note, file=sys.stderr, flush=True)
    setup = setup_training(cfg, runtime)
    start, last_saved = load_start(start_point, setup.model_chunks, setup.optimizer,
                                   setup.scheduler, cfg, is_first)
    if is_first:
        if start_point.folder:
            print(f"resumed from checkpoint step {start} in {start_point.folder.resolve()}",
                  flush=True)
        if start >= t.iters:
            print(f"checkpoint is at step {start} >= train.iters={t.iters}: nothing to train")
        print("\n".join(setup.data_summary), flush=True)
    return setup, start, last_saved


def train(cfg: GroveConfig, stop: StopSignals | None = None) -> TrainSummary:
    """Run the configured training (collective); ``stop``: the process's stop-signal handlers
    (installed by the caller), which end the run after the step every rank has seen a signal
    by. Raises, alike on every rank:
    :class:`~megatron_grove.training.preflight.PreflightError` (before anything is built),
    :class:`CheckpointError`, :class:`NonFiniteError` (too many non-finite steps in a row) and
    :class:`Preempted` (a stop signal; after its checkpoint)."""
    t = cfg.train
    setup, start, last_saved = _start(cfg)
    is_first = setup.runtime.rank == 0
    metrics = MetricsWriter(cfg.logging.dir, enabled=is_first,
                            tensorboard=cfg.logging.tensorboard, resume_step=start)
    if metrics.set_aside:
        print(f"logging.dir: this run starts at step 1; the earlier {metrics.path.name} was "
              f"moved to {metrics.set_aside}", flush=True)
    peak = peak_tflops(cfg.logging.peak_tflops, setup.runtime.device)
    forward_step = forward_step_func(cfg, setup.runtime.device)
    bar = tqdm(total=t.iters, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (is_first and cfg.logging.progress_bar))
    summary, skips = TrainSummary(), SkipCounter(t.max_skipped_steps)
    stragglers = StragglerDetector(cfg.logging)
    saver = (AsyncCheckpointSaver(log=print_on_rank0)
             if cfg.checkpoint.save and cfg.checkpoint.async_save else None)
    watchdog = (HangWatchdog(cfg.runtime.hang_timeout_s, cfg.logging.dir, setup.runtime.rank,
                             setup.runtime.world_size).start(start,
                                                             latest_checkpoint(cfg, last_saved))
                if cfg.runtime.hang_timeout_s else None)
    for step in range(start + 1, t.iters + 1):
        stragglers.step_began()
        result = train_step(setup, cfg, step, forward_step, stop and stop.received)
        health = result.health
        exchange = stragglers.step_ended(step)  # an all-gather every logging.straggler_interval
        record = {**_step_record(cfg, setup, step, result, peak), **exchange}
        for found in exchange.get("stragglers", []) if is_first else []:
            bar.write(straggler_line(step, found), file=sys.stderr)
        if validation_due(cfg, step, setup.valid_dataset is not None):
            val_loss = reduce_step_loss(validation_loss(
                cfg, setup.model_chunks, setup.valid_dataset, forward_step, setup.dp_rank,
                setup.dp_size), t.per_token_loss)
            record.update(validation_record(val_loss.value), val_loss_tokens=val_loss.tokens)
            summary.last_validation = record
            if is_first:
                bar.write(validation_line(step, t.iters, record))
        summary.count(result.loss)
        if (step % cfg.logging.log_interval == 0 or step == t.iters or not health.finite
                or "val_loss" in record or "stragglers" in record):
            metrics.write(record)
        bar.set_postfix(**_postfix(record))
        bar.update(1)
        note = skips.after_step(step, health, latest_checkpoint(cfg, last_saved))
        if note and is_first:
            tqdm.write(note, file=sys.stderr)
        if watchdog:  # again after the save below: a save may take its own hang_timeout_s
            watchdog.progress(step, latest_checkpoint(cfg, last_saved))
        stopping = step == t.iters or step == t.exit_at_iter or bool(health.stop_requested)
        interval = cfg.checkpoint.save_interval
        if (cfg.checkpoint.save and health.finite
                and (stopping or (interval and step % interval == 0))):
            save_step(cfg, setup.model_chunks, setup.optimizer, setup.scheduler, step,
                      latest_checkpoint(cfg, last_saved), saver)
            last_saved = step if saver is None else last_saved
        if saver is not None:  # published once every rank's write is done; a stop waits for it
            last_saved = publish_saves(cfg, saver, stopping,
                                       latest_checkpoint(cfg, last_saved)) or last_saved
        if watchdog:
            watchdog.progress(step, latest_checkpoint(cfg, last_saved))
        if health.stop_requested:
            raise Preempted(health.stop_requested, step,
                            latest_checkpoint(cfg, last_saved) if cfg.checkpoint.save else None)
        if stopping:
            break
    if watchdog:
        watchdog.close()
    bar.close()
    metrics.close()
    summary.skipped = skips.total
    summary.last_saved = last_saved if last_saved != start else None
    if is_first and summary.last_saved is not None:
        print(f"saved checkpoint step {last_saved} to {Path(cfg.checkpoint.save).resolve()}")
    return summary
