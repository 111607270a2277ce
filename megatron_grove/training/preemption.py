"""Preemption: SIGTERM, SIGINT and SIGUSR1 make the run finish its step, save and exit.

:class:`StopSignals` (a context manager around the training loop) records the first such
signal a rank receives; the loop's per-step agreement
(:func:`megatron_grove.training.nonfinite.step_health`) spreads it to every rank, so all ranks
stop after the same step, save a checkpoint there and raise :class:`Preempted`, which the
launcher turns into exit code :data:`PREEMPTED_EXIT` ("checkpoint saved: requeue or re-run
me"). A signal that arrives after a step's agreement is acted on at the end of the next step.
A second signal exits at once (code 128 + signal number), without saving.

What sends them: SLURM before the time limit (``--signal``; see
``launch/slurm/pretrain_grove.sbatch``), ``scancel``, Kubernetes, or Ctrl-C. torchrun forwards
SIGTERM and SIGINT to its workers (SIGUSR1 too with ``--signals-to-handle``) and kills them
``--shutdown-timeout`` seconds later (default 30): give it enough for one step and one save.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType

from megatron_grove.job_exit import exit_now

__all__ = ["STOP_SIGNALS", "PREEMPTED_EXIT", "StopSignals", "Preempted"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT = 4  # exit code: stopped by a signal, checkpoint saved; re-running resumes


class Preempted(Exception):
    """Raised alike on every rank after the agreed stop and its save. ``latest``: which
    checkpoint a re-run resumes from, in words (None: ``checkpoint.save`` is not set)."""

    def __init__(self, signals: tuple[str, ...], step: int, latest: str | None) -> None:
        self.signals, self.step, self.latest = signals, step, latest
        where = (f"{latest}; run the same command to resume" if latest
                 else "nothing saved (checkpoint.save is not set)")
        super().__init__(f"{' and '.join(signals)} received: stopped after step {step}; {where}")

    @property
    def exit_code(self) -> int:
        """:data:`PREEMPTED_EXIT` when checkpoints are saved, else 128 + the signal number."""
        return PREEMPTED_EXIT if self.latest else 128 + signal.Signals[self.signals[0]].value


class StopSignals:
    """Installs handlers for :data:`STOP_SIGNALS` (main thread only; elsewhere a no-op) and
    restores the previous ones on exit. ``received``: the first signal, or None. ``announce``:
    whether this rank prints the line for a second signal (rank 0)."""

    def __init__(self, announce: bool = True) -> None:
        self.received: signal.Signals | None = None
        self._announce = announce
        self._previous: dict[signal.Signals, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)
            return
        if self._announce:
            os.write(2, f"pretrain_grove.py: second signal ({signal.Signals(signum).name}): "
                        "exiting now without saving\n".encode())
        exit_now(128 + signum)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
