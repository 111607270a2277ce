"""Every workaround Megatron-Core needs to run on CPU, in one place.

Megatron-Core assumes CUDA in a handful of places. When a run's device is CPU
(``runtime.device=cpu``, or ``auto`` on a machine without a GPU) we apply the patches below,
once, before building any Megatron object: :func:`megatron_grove.runtime.initialize_parallel`
calls :func:`apply_cpu_patches` for a CPU device and never for a CUDA one. What counts is the
run's device, not the machine: on a GPU host a CPU run (the CPU test suite, a tool asked for
``--device cpu``) is patched the same way, and such a process must then not use CUDA itself.

Each patch is a :class:`CpuPatch` with a name, the upstream behaviour it replaces and an
``apply`` function; ``tests/test_cpu_patches.py`` holds one test per patch that fails if
upstream changes underneath it (the patched symbol disappears, or stops needing the patch).

Patches:

``cuda_device_to_cpu``
    Megatron allocates with ``device='cuda'`` / ``device=torch.cuda.current_device()`` /
    ``.cuda()`` throughout (router buffers, DDP grad buffers, optimizer scalars,
    grad-clipping norms). A global :class:`~torch.overrides.TorchFunctionMode` rewrites
    every CUDA device argument of a torch call to CPU, and ``torch.cuda.current_device``
    answers the CPU device without initialising CUDA (the mode does not reach autograd's
    backward passes; the CPU answer does).
``cuda_type_names``
    Megatron's grad clipping and mixed-precision optimizer check ``param.grad.type()``
    against ``'torch.cuda.FloatTensor'`` etc.; under the same mode, ``Tensor.type()`` (no
    argument) answers the CUDA name of a CPU tensor's type.
``cuda_streams_noop``
    ``torch.cuda.Stream`` / ``current_stream`` / ``stream(...)`` / ``Event`` /
    ``synchronize`` become inert stand-ins (CPU work is synchronous).
``cuda_rng_to_cpu``
    The model-parallel RNG tracker saves, seeds and restores the *CUDA* generator;
    it is redirected to the CPU generator so forks are real and reproducible.
``alltoall_splits_as_lists``
    ``all_to_all_single``'s binding accepts split sizes only as int sequences; Megatron's
    dispatcher hands over tensors / numpy arrays (seen failing in ``token_dispatch`` at
    EP=2 without this patch). They are converted to Python lists.
``gloo_all_gather_uneven``
    Under tensor parallelism Megatron's MoE dispatcher gathers each TP rank's routed tokens with
    ``all_gather`` into a list of tensors of different lengths; gloo requires equal shapes
    ("ProcessGroupGloo::allgather: invalid tensor size"). Uneven gathers are padded to the
    longest slice and trimmed after. (Gloo's list ``reduce_scatter``, used in the backward,
    accepts uneven slices.)
``distopt_reshardable_load_without_step``
    Without TE/Apex (always so on CPU) the distributed optimizer runs torch's Adam, which keeps
    a ``step`` tensor in each parameter's state. Loading a "fully_reshardable" checkpoint
    (the layout-independent format, :mod:`megatron_grove.checkpointing.optimizer_state`) copies
    every tensor of that state from the checkpoint, but the checkpoint keeps no per-parameter
    step: ``KeyError: 'step'``. The steps are set aside for the copy and put back after it.
``torch_compile_off``
    Megatron's ``jit_fuser`` is ``torch.compile``; on CPU that would compile every fused
    op with the C++ inductor backend on first use. Dynamo is disabled, so they run eagerly.

Two more CUDA assumptions need no patch: the causal attention mask Megatron would build on
CUDA (the training loop always passes an explicit CPU mask), and Megatron's optimizer, which
allocates with ``device='cuda'`` (covered by ``cuda_device_to_cpu``; Megatron's DDP with a plain
torch optimizer would not train at all, since its gradients land in ``main_grad``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["CpuPatch", "CPU_PATCHES", "apply_cpu_patches"]


@dataclass(frozen=True)
class CpuPatch:
    """One CPU workaround: ``apply()`` installs it; ``replaces`` says what upstream does."""

    name: str
    replaces: str
    apply: Callable[[], None]


# --------------------------------------------------------------------------------------
# cuda_device_to_cpu
# --------------------------------------------------------------------------------------


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int is how torch spells "cuda:<int>" in factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class _CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of every torch call to CPU; optionally reports CPU
    tensors' ``Tensor.type()`` names as their CUDA names."""

    report_cuda_type_names = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and self.report_cuda_type_names and len(args) == 1 \
                and not kwargs:
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": "cpu"}
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


_MODE: _CudaToCpuMode | None = None


def _patch_cuda_device_to_cpu() -> None:
    global _MODE
    if _MODE is None:
        _MODE = _CudaToCpuMode()
        _MODE.__enter__()  # stays pushed for the life of the process
    # The mode is thread-local state that autograd does not carry into backward(), and
    # Megatron's backward passes allocate with device=current_device(): answering the CPU
    # device itself covers those.
    torch.cuda.current_device = lambda: torch.device("cpu")  # type: ignore[assignment]


def _patch_cuda_type_names() -> None:
    _patch_cuda_device_to_cpu()
    _MODE.report_cuda_type_names = True


# --------------------------------------------------------------------------------------
# cuda_streams_noop
# --------------------------------------------------------------------------------------


class _InertStream:
    """Stand-in for ``torch.cuda.Stream``/``Event``: every method is a no-op returning an
    inert object (``record_event()`` gives an event whose ``synchronize()`` works)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Callable[..., "_InertStream"]:
        return lambda *args, **kwargs: _InertStream()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _InertStream)

    __hash__ = object.__hash__


_CURRENT_STREAM = _InertStream()


def _patch_cuda_streams_noop() -> None:
    torch.cuda.Stream = _InertStream  # type: ignore[misc, assignment]
    torch.cuda.Event = _InertStream  # type: ignore[misc, assignment]
    torch.cuda.current_stream = lambda *a, **k: _CURRENT_STREAM  # type: ignore[assignment]
    torch.cuda.default_stream = lambda *a, **k: _CURRENT_STREAM  # type: ignore[assignment]
    torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
    torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
    torch.cuda.is_current_stream_capturing = lambda: False  # type: ignore[assignment]


# --------------------------------------------------------------------------------------
# cuda_rng_to_cpu
# --------------------------------------------------------------------------------------


def _patch_cuda_rng_to_cpu() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    def get_state(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.get_rng_state()

    def set_state(new_state: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        torch.set_rng_state(new_state)

    mp_random._get_cuda_rng_state = get_state
    mp_random._set_cuda_rng_state = set_state
    torch.cuda.get_rng_state = get_state  # type: ignore[assignment]
    torch.cuda.set_rng_state = set_state  # type: ignore[assignment]
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all itself.
    torch.cuda.manual_seed = torch.default_generator.manual_seed  # type: ignore[assignment]
    torch.cuda.manual_seed_all = torch.default_generator.manual_seed  # type: ignore[assignment]


# --------------------------------------------------------------------------------------
# alltoall_splits_as_lists
# --------------------------------------------------------------------------------------


def _as_int_list(splits: Any) -> Any:
    if splits is None or isinstance(splits, list):
        return splits
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.tolist()]
    return [int(s) for s in splits]  # numpy arrays, tuples


def _patch_alltoall_splits_as_lists() -> None:
    dist = torch.distributed
    original = dist.all_to_all_single
    if getattr(original, "_grove_cpu_patch", False):
        return

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None,
                          group=None, async_op=False):
        return original(output, input, _as_int_list(output_split_sizes),
                        _as_int_list(input_split_sizes), group=group, async_op=async_op)

    all_to_all_single._grove_cpu_patch = True  # type: ignore[attr-defined]
    dist.all_to_all_single = all_to_all_single


# --------------------------------------------------------------------------------------
# gloo_all_gather_uneven
# --------------------------------------------------------------------------------------


def _patch_gloo_all_gather_uneven() -> None:
    dist = torch.distributed
    original = dist.all_gather
    if getattr(original, "_grove_cpu_patch", False):
        return

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        if all(out.shape == tensor.shape for out in tensor_list):
            return original(tensor_list, tensor, group=group, async_op=async_op)
        rows = max(out.shape[0] for out in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[:tensor.shape[0]] = tensor
        gathered = [torch.empty_like(padded) for _ in tensor_list]
        original(gathered, padded, group=group)
        for out, full in zip(tensor_list, gathered):
            out.copy_(full[:out.shape[0]])
        return None

    all_gather._grove_cpu_patch = True  # type: ignore[attr-defined]
    dist.all_gather = all_gather


# --------------------------------------------------------------------------------------
# distopt_reshardable_load_without_step
# --------------------------------------------------------------------------------------


def _patch_distopt_reshardable_load_without_step() -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    upstream = DistributedOptimizer.load_parameter_state_from_fully_reshardable
    if getattr(upstream, "_grove_cpu_patch", False):
        return

    def load_parameter_state_from_fully_reshardable(self, state_dict: dict) -> None:
        steps = {param: state.pop("step") for param, state in self.optimizer.state.items()
                 if "step" in state}
        try:
            upstream(self, state_dict)
        finally:
            for param, step in steps.items():
                self.optimizer.state[param]["step"] = step

    load_parameter_state_from_fully_reshardable._grove_cpu_patch = True  # type: ignore
    DistributedOptimizer.load_parameter_state_from_fully_reshardable = \
        load_parameter_state_from_fully_reshardable


# --------------------------------------------------------------------------------------
# torch_compile_off
# --------------------------------------------------------------------------------------


def _patch_torch_compile_off() -> None:
    import torch._dynamo

    torch._dynamo.config.disable = True


CPU_PATCHES: tuple[CpuPatch, ...] = (
    CpuPatch("cuda_device_to_cpu", "allocations on device='cuda' / current_device()",
             _patch_cuda_device_to_cpu),
    CpuPatch("cuda_type_names", "asserts that grads are 'torch.cuda.FloatTensor'",
             _patch_cuda_type_names),
    CpuPatch("cuda_streams_noop", "torch.cuda.Stream / current_stream / stream()",
             _patch_cuda_streams_noop),
    CpuPatch("cuda_rng_to_cpu", "model-parallel RNG tracker on the CUDA generator",
             _patch_cuda_rng_to_cpu),
    CpuPatch("alltoall_splits_as_lists", "all_to_all_single split sizes as tensors",
             _patch_alltoall_splits_as_lists),
    CpuPatch("gloo_all_gather_uneven", "all_gather of TP ranks' token slices of unequal length",
             _patch_gloo_all_gather_uneven),
    CpuPatch("distopt_reshardable_load_without_step",
             "fully_reshardable load copies a per-parameter Adam step it never saved",
             _patch_distopt_reshardable_load_without_step),
    CpuPatch("torch_compile_off", "megatron.core.jit.jit_fuser = torch.compile",
             _patch_torch_compile_off),
)

_APPLIED = False


def apply_cpu_patches() -> None:
    """Install every CPU patch (idempotent), for a process whose run device is CPU. Afterwards
    CUDA calls in this process answer for the CPU, whether or not a GPU is present."""
    global _APPLIED
    if _APPLIED:
        return
    for patch in CPU_PATCHES:
        patch.apply()
    _APPLIED = True

