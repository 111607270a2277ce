"""Run a function on N forked gloo processes with Megatron's parallel groups set up.

    results = run_distributed(fn, world_size=2, expert_parallel=2, args=(x,))

``fn(rank, *args)`` runs on every rank after :func:`initialize_parallel`; its return values
(picklable; tensors are fine) come back as a list indexed by rank. An exception on any rank
fails the caller with that rank's traceback. Forked workers start in ~0.2 s.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from typing import Any, Callable

import torch

# Import the heavy modules once in the parent so forked workers inherit them (~3 s each).
import megatron.core.models.gpt  # noqa: F401
import megatron.core.transformer.moe.moe_layer  # noqa: F401
from megatron_grove.runtime import destroy_parallel, initialize_parallel


def _worker(rank, world_size, init_file, parallel, fn, args, queue):
    # The parent's OpenMP thread pool does not survive fork(): a worker's first multi-threaded
    # op would hang once the parent ran one. One thread per worker, as DataLoader workers do.
    torch.set_num_threads(1)
    try:
        initialize_parallel(**parallel, device="cpu", timeout_s=120,
                            init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            # pickled to bytes: tensors sent as such would be shared by file descriptor and
            # vanish if this worker exits before the parent reads them
            queue.put((rank, "ok", pickle.dumps(fn(rank, *args))))
        finally:
            destroy_parallel()
    except BaseException:  # report everything, including SystemExit from the code under test
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, tensor_parallel: int = 1,
                    expert_parallel: int = 1, seed: int = 1234, args: tuple = (),
                    timeout_s: float = 300) -> list[Any]:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        parallel = dict(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                        seed=seed)
        procs = [ctx.Process(target=_worker,
                             args=(r, world_size, init_file, parallel, fn, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout_s)
                if status == "error":
                    errors.append(f"rank {rank}:\n{payload}")
                    break
                results[rank] = pickle.loads(payload)
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout_s)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]
