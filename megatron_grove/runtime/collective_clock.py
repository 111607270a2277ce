"""How long this rank waits inside torch.distributed collectives, and which one it is in now.

In synchronous training every rank's step takes the same wall time: the ranks that are
ahead wait for the slow one inside a collective. A rank's *own* time is its step time minus
that wait, plus the part of it during which the rank itself did not run (a stopped or
starved process: a ticker thread oversleeps); the straggler detector
(:mod:`megatron_grove.training.stragglers`) compares it across ranks, and the hang watchdog
(:mod:`megatron_grove.runtime.watchdog`) asks which collective each rank is waiting in.

:func:`collective_clock` wraps the module-level collectives of ``torch.distributed`` (and of
``torch.distributed.distributed_c10d``, which its object collectives call) that Megatron-Core,
torch's checkpointing and this package call (they look them up at call time:
``torch.distributed.all_reduce(...)``); a blocking call is timed around the call, an ``async_op=True`` call at
its work's ``wait()``. Nested calls (``all_gather_object`` calls ``all_gather``) count once.
Not seen: waits inside a coalescing manager's exit (Megatron's DDP gradient buckets with
``overlap_grad_reduce``) and, on GPU, the device-side wait of NCCL kernels (a call returns
once enqueued), so on GPU the measure is the host's time outside collective calls.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable

import torch.distributed as dist

__all__ = ["CollectiveClock", "collective_clock"]

_NAMES = ("all_reduce", "all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor",
          "reduce_scatter_tensor", "reduce_scatter", "broadcast", "reduce", "barrier",
          "monitored_barrier", "all_gather_object", "broadcast_object_list", "gather_object",
          "scatter_object_list", "gather", "scatter", "send", "recv", "_all_gather_base",
          "_reduce_scatter_base")
# torch.distributed re-exports distributed_c10d's functions; the object collectives there call
# the tensor ones through distributed_c10d's own globals: both namespaces get the wrapper
_NAMESPACES = (dist, dist.distributed_c10d)


class _TimedWork:
    """An async collective's work whose ``wait()`` is timed; everything else passes through."""

    def __init__(self, work: Any, clock: CollectiveClock, name: str) -> None:
        self._work, self._clock, self._name = work, clock, name

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        with self._clock.inside(self._name):
            return self._work.wait(*args, **kwargs)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._work, attr)


class _Inside:
    def __init__(self, clock: CollectiveClock, name: str) -> None:
        self.clock, self.name = clock, name

    def __enter__(self) -> None:
        clock = self.clock
        clock._depth += 1
        if clock._depth == 1:
            clock.current = (self.name, time.monotonic())

    def __exit__(self, *exc: object) -> None:
        clock = self.clock
        clock._depth -= 1
        if clock._depth == 0 and clock.current is not None:
            clock.waited_s += time.monotonic() - clock.current[1]
            clock.current = None


class CollectiveClock:
    """Seconds in collectives since installation (:attr:`waited_s`), the part of them this
    process did not run at all (:attr:`stalled_in_collectives_s`: stopped or starved, its own
    delay), and the collective the main thread is in now (:attr:`current`: ``(name, since
    monotonic time)`` or None)."""

    def __init__(self) -> None:
        self.waited_s = 0.0
        self.stalled_in_collectives_s = 0.0
        self.current: tuple[str, float] | None = None
        self._depth = 0
        self._originals: dict[str, Callable] = {}

    def _tick(self, every_s: float = 0.01, stall_s: float = 0.03) -> None:
        """A thread that wakes every 10 ms: a wake-up later than 30 ms means the process did
        not run meanwhile (stopped, or starved of CPU); such a gap inside a collective is this
        rank's own delay, not a wait for others (:attr:`stalled_in_collectives_s`)."""
        last = time.monotonic()
        while True:
            time.sleep(every_s)
            now = time.monotonic()
            if now - last > stall_s and self.current is not None:
                self.stalled_in_collectives_s += now - last - every_s
            last = now

    def inside(self, name: str) -> _Inside:
        """A context: the main thread is in collective ``name`` meanwhile."""
        return _Inside(self, name)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        main = threading.main_thread()

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if threading.current_thread() is not main:
                return fn(*args, **kwargs)
            if kwargs.get("async_op"):
                work = fn(*args, **kwargs)
                return _TimedWork(work, self, name) if work is not None else None
            with self.inside(name):
                return fn(*args, **kwargs)

        timed.__wrapped_by_collective_clock__ = True
        return timed

    def install(self) -> None:
        threading.Thread(target=self._tick, name="collective-clock-ticker", daemon=True).start()
        for name in _NAMES:
            fn = getattr(dist.distributed_c10d, name, None)
            if fn is None or getattr(fn, "__wrapped_by_collective_clock__", False):
                continue
            self._originals[name] = fn
            timed = self._wrap(name, fn)
            for namespace in _NAMESPACES:
                if getattr(namespace, name, None) is fn:
                    setattr(namespace, name, timed)

    def uninstall(self) -> None:
        for name, fn in self._originals.items():
            for namespace in _NAMESPACES:
                setattr(namespace, name, fn)
        self._originals.clear()


_CLOCK: CollectiveClock | None = None


def collective_clock() -> CollectiveClock:
    """The process's clock, installed on first use."""
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = CollectiveClock()
        _CLOCK.install()
    return _CLOCK
