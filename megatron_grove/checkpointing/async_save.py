"""Asynchronous checkpoint saves (``checkpoint.async_save: true``) on Megatron's machinery.

:func:`~megatron_grove.checkpointing.checkpoint.save_checkpoint_async` prepares a save and
returns Megatron's ``AsyncRequest``; :class:`AsyncCheckpointSaver` schedules it on Megatron's
``AsyncCallsQueue`` (a ``TemporalAsyncCaller``: a process forked per save writes the tensors,
so what it writes is the state at the fork, copy-on-write, while training goes on) and
finalises it once every rank's write has finished. The finalisation runs Megatron's own steps
(the write results gathered, ``.metadata``, ``metadata.json``) and then ours: the manifest, the
rename of the temporary folder into place and the ``latest`` pointer. Until then the previous
checkpoint stays the latest: a SIGKILL, a crash or a preemption during the write leaves it
intact, and the next save removes the stale temporary folder.

Rules:

* at most one write in flight: a save while one is pending first waits for it (one line in
  the log says so);
* :meth:`AsyncCheckpointSaver.poll` (every step; collective: a one-integer all-reduce)
  publishes a finished write; :meth:`~AsyncCheckpointSaver.wait` blocks until it is published
  (the end of training, and a stop signal: the pending write finishes before the stop's own
  save, which is then waited for too);
* the writer process dies with its rank (``PR_SET_PDEATHSIG``), so none outlives its job.

``MEGATRON_GROVE_TEST_SLOW_WRITE_S``: a test-only delay (seconds) at the start of every
background write, so that fault tests can kill a rank while a write is in flight.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_grove.checkpointing.manifest import record_written_files

__all__ = ["AsyncCheckpointSaver", "cross_process_write_results", "print_on_rank0",
           "SLOW_WRITE_ENV"]

SLOW_WRITE_ENV = "MEGATRON_GROVE_TEST_SLOW_WRITE_S"
_PR_SET_PDEATHSIG = 1


def cross_process_write_results() -> None:
    """Megatron's writer reports its results through a module-global queue. A background write
    runs in a forked process, so the queue must cross processes: a fork-context pipe queue
    (inherited by the writer at the fork), not Megatron's default ``Manager().Queue()``, whose
    spawned server process (~760 MB) outlives a SIGKILLed rank."""
    import multiprocessing

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = multiprocessing.get_context("fork").Queue()


def _die_with_parent() -> None:
    """Linux: this (forked writer) process gets SIGKILL when the rank that forked it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the writer finishes on its own
        pass


def _background_writer(write: Callable[..., None], delay_s: float) -> Callable[..., None]:
    """``write`` as the forked writer runs it: one torch thread (the parent's OpenMP pool does
    not survive the fork), dies with its rank, after the test-only delay; once written, the
    files are hashed here for the manifest (:func:`record_written_files`), off the training's
    path. ``write``'s arguments are Megatron's: ``(rank, write buckets, results queue)``, each
    bucket ``(file path, file name, data)``, the files in the checkpoint's temporary folder."""

    def run(*args: Any, **kwargs: Any) -> None:
        _die_with_parent()
        torch.set_num_threads(1)
        if delay_s > 0:
            time.sleep(delay_s)
        write(*args, **kwargs)
        rank, paths = args[0], [Path(bucket[0]) for bucket in args[1]]
        try:
            if paths:
                record_written_files(paths[0].parent, paths, rank)
        except OSError:  # then write_manifest reads them itself (and names what is wrong)
            pass

    return run


class AsyncCheckpointSaver:
    """One rank's asynchronous saves; every method is collective (all ranks call it at the same
    points). ``log``: where the waits are reported (rank 0 passes a printer, others None)."""

    def __init__(self, log: Callable[[str], None] | None = None) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self._log = log or (lambda line: None)
        self.pending_step: int | None = None  # the step whose write is in flight

    def save(self, root, model: torch.nn.Module, optimizer, state, optimizer_format: str) -> None:
        """Start saving ``state.step`` (see :func:`save_checkpoint_async`); a write still in
        flight is waited for first."""
        from megatron_grove.checkpointing.checkpoint import save_checkpoint_async

        if self.pending_step is not None:
            self._log(f"checkpoint: the write of step {self.pending_step} is still in flight; "
                      f"waiting for it before saving step {state.step} (at most one write at "
                      "a time)")
            self.wait()
        request = save_checkpoint_async(root, model, optimizer, state, optimizer_format)
        delay = float(os.environ.get(SLOW_WRITE_ENV, "0") or 0)
        if request.async_fn is not None:
            request = request._replace(async_fn=_background_writer(request.async_fn, delay))
        self._queue.schedule_async_request(request)
        self.pending_step = state.step

    def poll(self) -> int | None:
        """Publish the pending write if every rank has finished it; returns the step published
        now (None: nothing was)."""
        return self._finalize(blocking=False)

    def wait(self) -> int | None:
        """Block until the pending write (if any) is written and published; returns its step."""
        return self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> int | None:
        if self.pending_step is None:
            return None
        if not self._queue.maybe_finalize_async_calls(blocking=blocking):
            return None
        step, self.pending_step = self.pending_step, None
        return step


def print_on_rank0(line: str) -> None:
    """The saver's log on rank 0: one line on stderr."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(line, file=sys.stderr, flush=True)
