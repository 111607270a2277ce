"""The hang watchdog: when no step finishes within ``runtime.hang_timeout_s``, say where every
rank is and stop the job (exit 1) before the collective timeout, with the stacks on disk.

A thread per rank checks every second. The first rank whose timer runs out raises the alarm
in the process group's store (torchrun's, which outlives the workers); every rank that sees
it writes its Python stacks (all threads, :mod:`faulthandler`) to
``logging.dir/hang-rank{R}.txt`` and answers in the store with the last step it finished and
the collective its main thread is in (:mod:`.collective_clock`). The alarming rank waits up
to ``answer_s`` for the answers and prints one line naming the ranks that did not reach the
collective (no answer: stopped, dead, or stuck holding the interpreter; or answering from
outside any collective) and those waiting in it; then every live rank exits with code 1
(:func:`megatron_grove.job_exit.exit_now`), leaving the last checkpoint as it was (a save is
atomic: an interrupted one leaves only a temporary folder).
"""

from __future__ import annotations

import faulthandler
import json
import sys
import threading
import time
from pathlib import Path

import torch.distributed as dist

from megatron_grove.job_exit import exit_now
from megatron_grove.runtime.collective_clock import collective_clock
from megatron_grove.runtime.distributed import announce_failure

__all__ = ["HangWatchdog"]

_ALARM = "megatron_grove/hang/alarm"
_ANSWER = "megatron_grove/hang/rank{}"


def _ranks(ranks: list[int]) -> str:
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(map(str, ranks))


class HangWatchdog:
    """Start with :meth:`start`; call :meth:`progress` after every step (and its save)."""

    def __init__(self, timeout_s: int, log_dir: str, rank: int, world_size: int,
                 answer_s: float = 5.0) -> None:
        self.timeout_s, self.rank, self.world_size, self.answer_s = (timeout_s, rank, world_size,
                                                                     answer_s)
        self.log_dir = Path(log_dir)
        self.clock = collective_clock()
        self.step, self.latest = 0, ""
        self._last = time.monotonic()
        self._closed = False
        # the store itself, not distributed._store(): that one shortens the store's timeout
        # for everything else in the run
        self._store = dist.distributed_c10d._get_default_store()
        self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)

    def start(self, step: int, latest: str) -> HangWatchdog:
        self.progress(step, latest)
        self._thread.start()
        return self

    def close(self) -> None:
        """Training ended: stop watching."""
        self._closed = True

    def progress(self, step: int, latest: str) -> None:
        """Step ``step`` finished; ``latest``: the latest checkpoint, in words."""
        self.step, self.latest, self._last = step, latest, time.monotonic()

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(1.0)
            try:
                alarmed = self._store.check([_ALARM])
                if not alarmed and time.monotonic() - self._last > self.timeout_s:
                    first = self._store.add(_ALARM + "/count", 1) == 1
                    if first:
                        self._store.set(_ALARM, str(self.rank))
                    self._stop(reporter=first)
                elif alarmed:
                    self._stop(reporter=False)
            except Exception:  # the store is gone: the job is ending anyway
                return

    def _answer(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        path = self.log_dir / f"hang-rank{self.rank}.txt"
        with open(path, "w") as f:
            f.write(f"rank {self.rank}: stacks when the hang watchdog fired (last finished step "
                    f"{self.step})\n")
            f.flush()
            faulthandler.dump_traceback(f, all_threads=True)
        current = self.clock.current
        self._store.set(_ANSWER.format(self.rank), json.dumps({
            "step": self.step, "collective": current[0] if current else None,
            "waiting_s": time.monotonic() - current[1] if current else None}))

    def _stop(self, reporter: bool) -> None:
        self._answer()
        if reporter:
            deadline = time.monotonic() + self.answer_s
            keys = [_ANSWER.format(r) for r in range(self.world_size)]
            while time.monotonic() < deadline and not self._store.check(keys):
                time.sleep(0.1)
            answers = {r: json.loads(self._store.get(key)) for r, key in enumerate(keys)
                       if self._store.check([key])}
            missing = [r for r in range(self.world_size) if r not in answers
                       or answers[r]["collective"] is None]
            waiting = {r: a for r, a in answers.items() if a["collective"] is not None}
            where = "; ".join(f"{_ranks([r])} waits in {a['collective']} for {a['waiting_s']:.0f} s"
                              for r, a in waiting.items())
            message = (f"hang: no step finished within runtime.hang_timeout_s={self.timeout_s} s "
                       f"after step {self.step}; {_ranks(missing) if missing else 'no rank'} did "
                       f"not reach the collective"
                       + (f" ({where})" if where else "")
                       + f"; stacks in {self.log_dir}/hang-rank*.txt; {self.latest}; run the "
                       "same command to resume")
            announce_failure(self.rank, message)
            print(f"pretrain_grove.py: {message}", file=sys.stderr, flush=True)
        else:
            time.sleep(self.answer_s + 1.0)  # let the reporter print first
        exit_now(1)
