"""Process-level set-up: device choice, CPU patches, torch.distributed and Megatron's groups,
small object collectives, and how a failing rank tells its peers why the job stops.

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) or from explicit arguments (tests);
nothing here knows about SLURM.

**Failure reports.** A rank that stops the job for an ordinary reason (bad input, a full disk,
non-finite training, a signal) calls :func:`announce_failure` before it exits: the first rank
to do so prints its cause, the others (which usually hit the same agreed error) stay silent,
and peers whose next collective then fails read the cause with :func:`first_failure` and name
that rank in their own line, printed after the cause. The note lives in the default process
group's key-value store (under torchrun, the launcher's store, which outlives the workers).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_grove.config import ConfigError
from megatron_grove.runtime.cpu_patches import apply_cpu_patches
from megatron_grove.runtime.node_groups import (
    destroy_node_groups,
    initialize_node_groups,
    resolve_ranks_per_node,
)

__all__ = ["ParallelRuntime", "resolve_device", "initialize_parallel", "current_runtime",
           "destroy_parallel", "single_process_world", "collective_failure",
           "objects_from_all_ranks", "object_from_rank0", "announce_failure", "first_failure",
           "disk_full", "signal_when_parent_dies"]

# What gloo / NCCL / the c10d store say when a peer died, hung past the timeout or vanished.
_PEER_FAILURE_MARKERS = ("connection reset", "connection closed", "connection refused",
                         "broken pipe", "timed out", "timeout", "nccl", "gloo", "socket")


@dataclass(frozen=True)
class ParallelRuntime:
    """What a rank knows about where it runs."""

    device: torch.device
    rank: int
    world_size: int


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> cuda when a GPU is usable, else cpu; ``cuda`` without a GPU is a
    :class:`~megatron_grove.config.ConfigError`."""
    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise ConfigError("device cuda was asked for (runtime.device / --device) but this "
                          "machine has no usable GPU; use cpu (or auto)")
    if requested == "cuda" or (requested == "auto" and has_gpu):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def initialize_parallel(
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    virtual_pipeline: int | None = None,
    device: str = "auto",
    timeout_s: int = 300,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    ranks_per_node: int | None = None,
    expert_tensor_parallel: int | None = None,
    context_parallel: int = 1,
) -> ParallelRuntime:
    """Start torch.distributed (gloo on CPU, NCCL on GPU), Megatron's parallel groups and the
    EP group's node groups (:mod:`.node_groups`; ``ranks_per_node`` None: torchrun's
    ``LOCAL_WORLD_SIZE``), and seed Megatron's model-parallel RNG tracker.
    ``expert_tensor_parallel`` None: the experts share attention's TP size (Megatron's default)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    dev = resolve_device(device)
    if dev.type == "cpu":
        apply_cpu_patches()
    else:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs = {}
        if init_method is not None:
            kwargs.update(init_method=init_method, rank=rank, world_size=world_size)
        dist.init_process_group(backend="gloo" if dev.type == "cpu" else "nccl",
                                timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
        context_parallel_size=context_parallel,
        distributed_timeout_minutes=timeout_s / 60,  # Megatron makes a timedelta of it
    )
    initialize_node_groups(resolve_ranks_per_node(ranks_per_node, dist.get_world_size()))
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return current_runtime(dev)


def current_runtime(device: torch.device) -> ParallelRuntime:
    """Describe this rank from the already initialised default process group."""
    return ParallelRuntime(device=device, rank=dist.get_rank(), world_size=dist.get_world_size())


def destroy_parallel() -> None:
    """Tear down Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    destroy_node_groups()
    if dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def single_process_world(device: str = "cpu", seed: int = 1234) -> Iterator[ParallelRuntime]:
    """A private world of one process (TP = EP = 1) for tools (conversion, evaluation), torn
    down on exit; inside an already initialised world (tests, torchrun) that world is used."""
    from megatron.core import parallel_state

    if dist.is_initialized() and parallel_state.model_parallel_is_initialized():
        yield current_runtime(resolve_device(device))
        return
    with tempfile.TemporaryDirectory() as tmp:
        runtime = initialize_parallel(seed=seed, device=device, init_method=f"file://{tmp}/init",
                                      rank=0, world_size=1)
        try:
            yield runtime
        finally:
            destroy_parallel()


def collective_failure(exc: BaseException) -> str | None:
    """A one-line reason when ``exc`` is a failed collective (a peer rank died, hung past
    ``runtime.dist_timeout_s`` or the network failed); None for any other error."""
    if not isinstance(exc, (dist.DistError, RuntimeError)):
        return None
    text = str(exc).strip()
    if not isinstance(exc, dist.DistError) and not any(m in text.lower()
                                                       for m in _PEER_FAILURE_MARKERS):
        return None
    first = text.splitlines()[0] if text else type(exc).__name__
    if "] " in first:  # drop gloo's "[/path/to/pair.cc:537] " source-location prefix
        first = first.split("] ", 1)[1]
    return first.split(". This is typically")[0][:200]


def signal_when_parent_dies(sig: int, poll_s: float = 1.0) -> None:
    """Send this process ``sig`` once when its parent (torchrun) dies, e.g. killed with SIGKILL,
    so that no worker trains on as an orphan. A daemon thread checks the parent every
    ``poll_s`` seconds (Linux's PR_SET_PDEATHSIG would fire once per exiting thread of a
    multi-threaded parent, i.e. several times)."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os.kill(os.getpid(), sig)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def objects_from_all_ranks(local: Any) -> list[Any]:
    """Every rank's picklable ``local``, indexed by rank, on every rank (collective; a list of
    one outside torch.distributed)."""
    if not dist.is_initialized():
        return [local]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, local)
    return out


def object_from_rank0(value: Any) -> Any:
    """Rank 0's picklable ``value`` on every rank (collective; ``value`` outside
    torch.distributed)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


_FAILURE_COUNT = "megatron_grove/failures"
_FAILURE_NOTE = "megatron_grove/first_failure"
_STORE_TIMEOUT = datetime.timedelta(seconds=5)  # a store that does not answer is gone


def _store():
    """The default process group's store with a short timeout, or None."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set_timeout(_STORE_TIMEOUT)
        return store
    except Exception:  # no process group, or its store is gone: reports degrade to generic
        return None


def announce_failure(rank: int, message: str) -> bool:
    """Record that rank ``rank`` stops the job because of ``message`` (one line). True when this
    rank is the first to stop: it should print the cause; False for later ones. Without a
    reachable store every rank counts as the first."""
    store = _store()
    if store is None:
        return True
    try:
        if store.add(_FAILURE_COUNT, 1) != 1:
            return False
        store.set(_FAILURE_NOTE, f"rank {rank}: {message}")
    except Exception:
        pass
    return True


def first_failure(wait_s: float = 3.0) -> str | None:
    """The note (``"rank R: message"``) of the rank that stopped the job first, waiting up to
    ``wait_s`` for it to appear; None when no rank announced one (e.g. a rank was killed)."""
    store = _store()
    if store is None:
        return None
    deadline = time.monotonic() + wait_s
    try:
        while not store.check([_FAILURE_NOTE]):
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)
        return store.get(_FAILURE_NOTE).decode(errors="replace")
    except Exception:
        return None


_NO_SPACE = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc``, its causes and contexts, and the per-rank exceptions of a torch distributed
    checkpoint failure (``CheckpointException.failures``)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        todo += [current.__cause__, current.__context__]
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            todo += [pair[0] for pair in failures.values() if isinstance(pair, tuple) and pair]


def disk_full(exc: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """``"no space left on device writing PATH"`` (or the quota's) when ``exc`` or one of its
    causes is a full disk or an exceeded quota; else, when ``where`` (a folder being written)
    is given and its filesystem is (almost) full, ``"no space left on device in WHERE (N bytes
    free)"`` (Megatron's checkpoint writer and torch's zip writer can lose the error number);
    else None."""
    for cause in _causes(exc):
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            at = f" writing {cause.filename}" if cause.filename else ""
            return f"{_NO_SPACE[cause.errno]}{at}"
        text = str(cause)
        for code, what in _NO_SPACE.items():
            if os.strerror(code) in text:  # e.g. a worker's OSError flattened into a message
                path = re.search(os.strerror(code) + r": '([^']+)'", text)
                return f"{what} writing {path.group(1)}" if path else what
    if where is not None:
        try:
            usage = shutil.disk_usage(where)
        except OSError:
            return None
        if usage.free < max(64 << 20, usage.total // 200):  # under 64 MiB or 0.5 %
            return f"no space left on device in {where} ({usage.free} bytes free)"
    return None
