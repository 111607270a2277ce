"""Which fast paths a run uses: Triton kernels, TransformerEngine modules, FP8.

Resolved once from the run config and the device, then carried by
:class:`~megatron_grove.megatron_config.GroveTransformerConfig` (``grove_kernels_backend``,
``grove_transformer_engine``, Megatron's ``fp8`` fields). Every impossible request is a
:class:`~megatron_grove.config.ConfigError` naming the key, raised before anything is built:

* ``kernels.backend``: ``auto`` = ``triton`` on a GPU, ``torch`` on CPU; ``triton`` on CPU
  works only under ``TRITON_INTERPRET=1`` (slow; tests).
* ``precision.transformer_engine``: ``null`` = TE modules (``TEGroupedMLP`` experts and
  adjugates, TE linears/attention) when TE imports and the device is CUDA; ``true`` requires
  them; ``false`` never uses them.
* ``precision.fp8`` (``e4m3`` | ``hybrid``) with ``precision.fp8_recipe`` (``delayed`` |
  ``current``, Megatron's ``tensorwise``) needs TE, a GPU and ``runtime.dtype=bf16``.
* ``parallel.context_parallel_size > 1`` needs TE's attention (Megatron's context parallelism
  runs in ``TEDotProductAttention``), hence a GPU.

TransformerEngine is imported only here, lazily, and only when a GPU is in use: importing a
broken TE breaks ``import megatron.core`` on CPU machines.
"""

from __future__ import annotations

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Optional

from megatron_grove.config import ConfigError, GroveConfig, PrecisionConfig

__all__ = ["Acceleration", "resolve_acceleration", "megatron_fields",
           "transformer_engine_available", "FP8_RECIPES"]

# our recipe names -> Megatron's fp8_recipe
FP8_RECIPES = {"delayed": "delayed", "current": "tensorwise"}


@dataclass(frozen=True)
class Acceleration:
    kernels_backend: str  # "torch" | "triton"
    transformer_engine: bool
    fp8: Optional[str]  # None | "e4m3" | "hybrid"
    fp8_recipe: Optional[str]  # Megatron's name, or None without fp8


@functools.cache
def transformer_engine_available() -> bool:
    """True when ``transformer_engine.pytorch`` imports (never tried without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # not installed, or installed but broken (wrong CUDA, ...)
        return False
    return True


def _device_type(cfg: GroveConfig) -> str:
    import torch

    if cfg.runtime.device == "cuda" or (cfg.runtime.device == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resolve_acceleration(cfg: GroveConfig, device_type: Optional[str] = None) -> Acceleration:
    """The fast paths for ``cfg`` on ``device_type`` (default: the device ``cfg`` runs on)."""
    device_type = device_type or _device_type(cfg)
    on_gpu = device_type == "cuda"
    backend = cfg.kernels.backend
    if backend == "auto":
        backend = "triton" if on_gpu else "torch"
    if backend == "triton" and not on_gpu and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("kernels.backend=triton on CPU needs TRITON_INTERPRET=1 in the "
                          "environment (Triton's slow interpreter, for tests); use "
                          "kernels.backend=torch or auto")
    prec = cfg.precision
    want_te = prec.transformer_engine is True or prec.fp8 is not None
    te = prec.transformer_engine is not False and on_gpu and transformer_engine_available()
    no_te = ("precision.transformer_engine=false" if prec.transformer_engine is False else
             "no GPU is in use" if not on_gpu else "transformer_engine.pytorch does not import")
    if want_te and not te:
        key = (f"precision.fp8={prec.fp8}" if prec.fp8 is not None
               else "precision.transformer_engine=true")
        raise ConfigError(f"{key} needs TransformerEngine on a GPU, but {no_te}; install the gpu "
                          "extra (pip install megatron-grove[gpu]) on a CUDA machine, or set "
                          "precision.fp8=null precision.transformer_engine=null")
    cp = cfg.parallel.context_parallel_size
    if cp > 1 and not te:
        raise ConfigError(f"parallel.context_parallel_size={cp} needs TransformerEngine attention "
                          f"on a GPU (Megatron's context parallelism), but {no_te}; set "
                          "parallel.context_parallel_size=1 or run on GPUs with the gpu extra")
    if prec.fp8 is not None and cfg.runtime.dtype != "bf16":
        raise ConfigError(f"precision.fp8={prec.fp8} needs runtime.dtype=bf16 (FP8 GEMMs keep "
                          f"bf16 weights and activations), got runtime.dtype={cfg.runtime.dtype}")
    return Acceleration(kernels_backend=backend, transformer_engine=te, fp8=prec.fp8,
                        fp8_recipe=FP8_RECIPES[prec.fp8_recipe] if prec.fp8 else None)


def megatron_fields(acc: Acceleration, precision: PrecisionConfig) -> dict:
    """The ``GroveTransformerConfig`` keyword arguments that carry ``acc``."""
    return dict(
        moe_grouped_gemm=acc.transformer_engine,  # TEGroupedMLP experts (and adjugates)
        # Megatron's hook for an activation *module* applied to the whole fc1 output (ours:
        # kernels.swiglu.SwiGLU, put in the layer spec); the name predates non-TE modules.
        use_te_activation_func=acc.kernels_backend == "triton",
        fp8=acc.fp8,
        fp8_recipe=acc.fp8_recipe or "delayed",
        fp8_amax_history_len=precision.fp8_amax_history_len if acc.fp8 else 1,
        fp8_amax_compute_algo="max" if acc.fp8_recipe == "delayed" else "most_recent",
        grove_kernels_backend=acc.kernels_backend,
        grove_transformer_engine=acc.transformer_engine,
    )
