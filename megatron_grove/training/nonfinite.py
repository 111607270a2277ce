"""The non-finite guard: no optimizer step, and no checkpoint, from a non-finite loss or gradient.

After the forward/backward pass and Megatron's gradient reduction, and before the optimizer
step, every rank checks its loss and its gradients (``param.main_grad``, which Megatron's DDP
has already reduced over the data-parallel ranks) and the ranks agree in one small collective
(:func:`step_health`, which also carries whether a rank received a stop signal, so one
collective per step serves both). A step with a non-finite loss or gradient on any rank is
skipped by every rank: no weight update, no Adam update, no expert-bias update, no LR-schedule
step (as Megatron-LM does for a skipped iteration), and no checkpoint that step.
:class:`SkipCounter` counts the skips and stops the run with :class:`NonFiniteError` after
``train.max_skipped_steps`` consecutive ones. :func:`first_nonfinite_weight` guards saves.
"""

from __future__ import annotations

import math
import signal as signal_module
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_grove.runtime.distributed import objects_from_all_ranks

__all__ = ["NonFiniteError", "StepHealth", "step_health", "SkipCounter", "first_nonfinite_weight"]


class NonFiniteError(RuntimeError):
    """Training produced non-finite values it cannot step over; the message is one line."""


@dataclass(frozen=True)
class StepHealth:
    """What the ranks agreed on for one step (the same on every rank)."""

    nonfinite_loss: tuple[int, ...]  # ranks whose loss is not finite
    nonfinite_grad: tuple[int, ...]  # ranks with a non-finite gradient element
    stop_requested: tuple[str, ...]  # signals received so far, over all ranks (e.g. "SIGTERM")

    @property
    def finite(self) -> bool:
        return not self.nonfinite_loss and not self.nonfinite_grad

    def describe(self) -> str:
        """e.g. ``"non-finite loss on ranks 0, 1 and gradient on rank 1"``."""
        parts = [f"{what} on rank{'s' if len(ranks) > 1 else ''} "
                 f"{', '.join(str(r) for r in ranks)}"
                 for what, ranks in (("loss", self.nonfinite_loss),
                                     ("gradient", self.nonfinite_grad)) if ranks]
        return "non-finite " + " and ".join(parts)


def _chunks(model: torch.nn.Module | list[torch.nn.Module]) -> list[torch.nn.Module]:
    """A model, or this rank's model chunks (virtual pipeline stages), as a list."""
    return model if isinstance(model, list) else [model]


def _grads_finite(model: torch.nn.Module | list[torch.nn.Module]) -> bool:
    """All gradients finite. A sum is finite iff its terms are (barring an overflow past
    3.4e38, itself a broken gradient), so this costs one reduction per parameter."""
    sums = [param.main_grad.sum(dtype=torch.float32) for chunk in _chunks(model)
            for param in chunk.parameters() if getattr(param, "main_grad", None) is not None]
    return not sums or bool(torch.isfinite(torch.stack(sums).sum()))


def step_health(loss: torch.Tensor, model: torch.nn.Module | list[torch.nn.Module],
                signal: signal_module.Signals | None) -> StepHealth:
    """Collective over all ranks (one all-reduce of ``world x 3`` numbers): this rank's
    ``loss`` (its micro-batches' mean; under pipeline parallelism its last stage's), the
    gradients of its model (chunks) and the stop signal it received (None if none) -> the
    agreed :class:`StepHealth`. Every pipeline stage checks its own gradients."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    flags = torch.zeros(world, 3, dtype=torch.float32, device=loss.device)
    flags[rank] = torch.tensor([not math.isfinite(float(loss)), not _grads_finite(model),
                                int(signal or 0)], dtype=torch.float32)
    if dist.is_initialized():
        dist.all_reduce(flags)
    rows = flags.tolist()
    return StepHealth(
        nonfinite_loss=tuple(r for r, row in enumerate(rows) if row[0]),
        nonfinite_grad=tuple(r for r, row in enumerate(rows) if row[1]),
        stop_requested=tuple(sorted({signal_module.Signals(int(row[2])).name
                                     for row in rows if row[2]})))


class SkipCounter:
    """Counts skipped steps; :meth:`after_step` raises :class:`NonFiniteError` once more than
    ``max_consecutive`` steps in a row were skipped (0: the first skip stops the run)."""

    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def after_step(self, step: int, health: StepHealth, last_saved: str) -> str | None:
        """Count ``step``; a one-line note for a skipped step, None for a good one.
        ``last_saved`` names the checkpoint a stop would leave as the latest."""
        if health.finite:
            self.consecutive = 0
            return None
        self.total += 1
        self.consecutive += 1
        if self.consecutive > self.max_consecutive:
            raise NonFiniteError(
                f"step {step}: {health.describe()} for {self.consecutive} consecutive steps "
                f"(train.max_skipped_steps={self.max_consecutive}); stopped without saving "
                f"({last_saved}); lower train.lr or check the data, then resume")
        return (f"step {step}: {health.describe()}; update skipped ({self.consecutive} in a "
                f"row, {self.total} in all; train.max_skipped_steps={self.max_consecutive} in a "
                "row are allowed)")


def first_nonfinite_weight(model: torch.nn.Module | list[torch.nn.Module]) -> str | None:
    """Collective: the name of the first parameter holding a non-finite value on any rank
    (``"rank R: NAME"``), or None when every weight is finite."""
    modules = [chunk.module if hasattr(chunk, "module") else chunk for chunk in _chunks(model)]
    local = next((name for module in modules for name, param in module.named_parameters()
                  if not bool(torch.isfinite(param.detach()).all())), None)
    found = [(rank, name) for rank, name in enumerate(objects_from_all_ranks(local)) if name]
    return f"rank {found[0][0]}: {found[0][1]}" if found else None
