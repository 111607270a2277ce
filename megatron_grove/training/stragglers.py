"""Name the rank that slows every step.

Each rank measures its *own* time per step: the step's wall time minus what it waited inside
collectives for the other ranks (:mod:`megatron_grove.runtime.collective_clock`; the ranks
that are ahead wait there for the slow one, so wall times alone are equal). Every
``logging.straggler_interval`` steps the ranks exchange their mean own time over the interval
(one all-gather of one float per rank). A rank whose time exceeds the median (the lower
median: with 2 ranks the faster one's) by ``logging.straggler_factor`` in
``logging.straggler_intervals`` exchanges in a row is a straggler: rank 0 prints one line per
exchange while it stays one. The exchange step's ``metrics.jsonl`` record carries
``"rank_step_time_s"`` (each rank's time), ``"straggler_exchange_s"`` (what the exchange
took: its cost) and ``"stragglers": [{"rank", "host", "step_time_s", "median_s",
"intervals", "first_step"}]``.
"""

from __future__ import annotations

import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from megatron_grove.config import LoggingConfig
from megatron_grove.runtime.collective_clock import collective_clock
from megatron_grove.runtime.distributed import objects_from_all_ranks

__all__ = ["StragglerDetector", "straggler_line"]


def straggler_line(step: int, found: dict[str, Any]) -> str:
    """The one line about the straggler ``found`` by the exchange at step ``step``."""
    ratio = found["step_time_s"] / found["median_s"] if found["median_s"] > 0 else float("inf")
    return (f"straggler: rank {found['rank']} ({found['host']}) takes {found['step_time_s']:.3f} "
            f"s per step of its own (steps {found['first_step']}-{step}), {ratio:.1f}x the "
            f"median {found['median_s']:.3f} s, for {found['intervals']} intervals in a row")


class StragglerDetector:
    """Call :meth:`step_began` and :meth:`step_ended` around every step, on every rank."""

    def __init__(self, cfg: LoggingConfig) -> None:
        self.interval, self.factor, self.patience = (cfg.straggler_interval, cfg.straggler_factor,
                                                     cfg.straggler_intervals)
        self.enabled = self.interval > 0 and dist.is_initialized() and dist.get_world_size() > 1
        if not self.enabled:
            return
        self.clock = collective_clock()
        self.hosts = objects_from_all_ranks(socket.gethostname())
        self.streak = [0] * len(self.hosts)
        self.own_s, self.steps, self.first = 0.0, 0, None
        self._began = self._waited = 0.0

    def _others_s(self) -> float:
        """Seconds waited for other ranks so far."""
        return self.clock.waited_s - self.clock.stalled_in_collectives_s

    def step_began(self) -> None:
        if self.enabled:
            self._began, self._waited = time.perf_counter(), self._others_s()

    def step_ended(self, step: int) -> dict[str, Any]:
        """Collective every ``interval`` steps: the fields for that step's metrics record,
        ``rank_step_time_s`` (each rank's own mean time per step over the interval) and, if
        any, ``stragglers``; other steps ``{}``."""
        if not self.enabled:
            return {}
        self.own_s += (time.perf_counter() - self._began) - (self._others_s() - self._waited)
        self.steps += 1
        self.first = step if self.first is None else self.first
        if step % self.interval:
            return {}
        began = time.perf_counter()
        mine = torch.tensor([self.own_s / self.steps], dtype=torch.float64)
        times = [torch.zeros_like(mine) for _ in self.hosts]
        dist.all_gather(times, mine)
        own = [float(t) for t in times]
        median = statistics.median_low(own)
        found = []
        for rank, seconds in enumerate(own):
            self.streak[rank] = self.streak[rank] + 1 if seconds > self.factor * median else 0
            if self.streak[rank] >= self.patience:
                found.append({"rank": rank, "host": self.hosts[rank], "step_time_s": seconds,
                              "median_s": median, "intervals": self.streak[rank],
                              "first_step": self.first})
        self.own_s, self.steps, self.first = 0.0, 0, None
        return {"rank_step_time_s": own, "straggler_exchange_s": time.perf_counter() - began,
                **({"stragglers": found} if found else {})}
