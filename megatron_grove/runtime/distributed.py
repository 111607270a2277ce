"""Process-level set-up: device choice, CPU patches, torch.distributed and Megatron's groups.

Rank and world size come from torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) or from explicit arguments (tests);
nothing here knows about SLURM.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_grove.runtime.cpu_patches import apply_cpu_patches

__all__ = ["ParallelRuntime", "resolve_device", "initialize_parallel", "current_runtime",
           "destroy_parallel", "single_process_world", "collective_failure"]

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
    """``auto`` -> cuda when a GPU is usable, else cpu; ``cuda`` without a GPU is an error."""
    has_gpu = torch.cuda.is_available()
    if requested == "cuda" and not has_gpu:
        raise RuntimeError("runtime.device=cuda but no usable GPU was found; use runtime.device=cpu")
    if requested == "cuda" or (requested == "auto" and has_gpu):
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def initialize_parallel(
    tensor_parallel: int = 1,
    expert_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    device: str = "auto",
    timeout_s: int = 300,
    init_method: str | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> ParallelRuntime:
    """Start torch.distributed (gloo on CPU, NCCL on GPU) and Megatron's parallel groups,
    and seed Megatron's model-parallel RNG tracker."""
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
        expert_model_parallel_size=expert_parallel,
        distributed_timeout_minutes=timeout_s / 60,  # Megatron makes a timedelta of it
    )
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
