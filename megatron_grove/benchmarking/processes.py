"""The benchmarks' processes: ``world_size`` spawned ranks (gloo on CPU, NCCL with one GPU
each) that rendezvous through a file, run one function and hand rank 0's result back."""

from __future__ import annotations

import os
import tempfile
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

__all__ = ["run_on_ranks", "cpu_threads_per_rank"]


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
