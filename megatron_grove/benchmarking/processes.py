"""The benchmarks' processes: ``world_size`` spawned ranks (gloo on CPU, NCCL with one GPU
each) that rendezvous through a file, run one function and hand rank 0's result back."""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from megatron_grove.benchmarking.emulated_cluster import link_tx_bytes

__all__ = ["run_on_ranks", "cpu_threads_per_rank", "LinkMeter", "rotated"]


def rotated(variants: tuple[str, ...], repetition: int) -> tuple[str, ...]:
    """The order of ``variants`` in repetition ``repetition`` of an interleaved benchmark:
    rotated by one each repetition (a, b, c, d; b, c, d, a; ...), so that no variant always
    runs right after the same one or always last (the last of a round measured a few percent
    slower here, whatever it was)."""
    shift = repetition % len(variants)
    return variants[shift:] + variants[:shift]


def cpu_threads_per_rank(world_size: int) -> int:
    """The CPU cores shared out between ``world_size`` processes (at least one each)."""
    return max(1, (os.cpu_count() or 1) // world_size)


def _rank_main(rank: int, fn: Callable[..., Any], init_method: str, args: tuple, queue) -> None:
    os.environ["LOCAL_RANK"] = str(rank)
    try:
        result = fn(rank, init_method, *args)
        if rank == 0:
            queue.put(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - report any failure to the parent
        queue.put(("error", f"rank {rank}: {exc}\n{traceback.format_exc()}"))


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> Any:
    """``fn(rank, init_method, *args)`` on ``world_size`` spawned processes (``fn`` a module-level
    function that starts torch.distributed with ``init_method``, ``rank`` and ``world_size``);
    returns what rank 0 returned, or raises ``RuntimeError`` with the first failing rank's
    traceback."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_method = f"file://{os.path.join(tmp, 'init')}"
        procs = [ctx.Process(target=_rank_main, args=(r, fn, init_method, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        status, payload = queue.get()
        for p in procs:
            p.join(timeout=60 if status == "ok" else 5)
            if p.is_alive():
                p.kill()
    if status != "ok":
        raise RuntimeError(payload)
    return payload


class LinkMeter:
    """Bytes a node sent on its link ``device`` between :meth:`start` and :meth:`stop`, from the
    kernel's counter (an emulated cluster's node link; see ``emulated_cluster``). Every rank
    calls both; the node's first rank (``LOCAL_RANK`` 0) reads the counter, then all wait on a
    barrier (:meth:`start`: no rank sends before the reading), or all wait on a barrier and
    then it reads (:meth:`stop`: every rank's traffic is in). :meth:`stop` returns the bytes on
    that rank, 0 on every other, so a sum over ranks is what crossed the links. Without a
    device both are no-ops returning 0."""

    def __init__(self, device: str | None) -> None:
        self.device = device
        self.reads = device is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0
        self._began = 0

    def start(self) -> None:
        if self.device is None:
            return
        import torch.distributed as dist

        if self.reads:
            self._began = link_tx_bytes(self.device)
        dist.barrier()

    def stop(self) -> int:
        if self.device is None:
            return 0
        import torch.distributed as dist

        dist.barrier()
        return link_tx_bytes(self.device) - self._began if self.reads else 0
