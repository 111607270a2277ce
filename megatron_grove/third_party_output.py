"""Quiet third-party output: the deprecation and fallback banners Megatron-Core, torch and
transformers print on every import, run and rank, which the user can do nothing about.

:func:`quiet_third_party` (called when ``megatron_grove`` is imported, before Megatron is)
filters exactly the messages in :data:`BANNERS` by their start; every other warning, log
record or error still comes through. ``MEGATRON_GROVE_VERBOSE=1`` in the environment keeps
them all (torchrun passes it to every rank).
"""

from __future__ import annotations

import logging
import os
import re
import warnings

__all__ = ["VERBOSE_ENV_VAR", "BANNERS", "LOGGED_BANNERS", "quiet_third_party"]

VERBOSE_ENV_VAR = "MEGATRON_GROVE_VERBOSE"

# warnings.warn banners: (message start, category, regex of the module that warns)
BANNERS: tuple[tuple[str, type[Warning], str], ...] = (
    # Megatron without Transformer Engine / Apex (any CPU run): its torch fallbacks are ours
    ("Transformer Engine and Apex are not installed. Falling back", UserWarning, r"megatron\."),
    ("Apex is not installed. Falling back to Torch Norm", UserWarning, r"megatron\."),
    # TransformerConfig's default cuda_graph_modules on Megatron-Core 0.19
    ("full scope is deprecated", UserWarning, r"megatron\."),
    # defined when megatron.core.models is imported; we do not use MIMO models
    ("MimoModelConfig is experimental", UserWarning, r"megatron\."),
    # torch.distributed.checkpoint read outside a process group (the tools read configs so)
    ("torch.distributed is disabled, unavailable or uninitialized", UserWarning, r"torch\."),
    # torch 2.13 renamed it all_gather_single; Megatron-Core 0.19 calls the old name (its router,
    # gradient buffers, tensor-parallel mappings)
    ("`torch.distributed.all_gather_into_tensor` is deprecated", FutureWarning, r"torch\."),
)

# logger name -> message starts it logs that are banners
LOGGED_BANNERS: dict[str, tuple[str, ...]] = {
    "megatron.core.models.gpt.gpt_model": ("GPTModel IS DEPRECATED",),
    # printed by Megatron's torch_dist writer on the first save, async or not
    "megatron.core.dist_checkpointing.strategies.torch": ("MCore's async save is deprecated",),
    # a CPU-only torch looking for CUDA
    "torch.utils.cpp_extension": ("No CUDA runtime is found",),
}


class _BannerFilter(logging.Filter):
    """Drops the log records whose message starts with one of ``starts``."""

    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def quiet_third_party() -> None:
    """Install the filters of :data:`BANNERS` and :data:`LOGGED_BANNERS` (idempotent); nothing
    when ``MEGATRON_GROVE_VERBOSE=1``."""
    if os.environ.get(VERBOSE_ENV_VAR) == "1":
        return
    for start, category, module in BANNERS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category,
                                module=module)
    for name, starts in LOGGED_BANNERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _BannerFilter) for f in logger.filters):
            logger.addFilter(_BannerFilter(starts))

