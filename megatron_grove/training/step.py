"""One training step: forward/backward, the non-finite guard, the optimizer, the MoE counters.

:func:`train_step` runs step ``s`` on the run built by :func:`~.setup.setup_training`: the
step's micro-batches through Megatron's forward/backward schedule, the guard every rank agrees
on (:func:`~.nonfinite.step_health`, which also carries the stop signals), then either the
optimizer, LR-schedule and expert-bias updates or, for a non-finite step, none of them. The
loop (:mod:`.loop`) decides what happens around it: validation, logging, saving, stopping.
"""

from __future__ import annotations

import functools
import math
import signal as signal_module
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_grove.config import GroveConfig
from megatron_grove.model import causal_attention_mask
from megatron_grove.moe.balancing import training_routers, update_expert_bias
from megatron_grove.moe.counters import collect_moe_counters, reset_moe_counters
from megatron_grove.training.context_parallel import cp_rank_share
from megatron_grove.training.data import micro_batches
from megatron_grove.training.nonfinite import StepHealth, step_health
from megatron_grove.training.setup import TrainingSetup

__all__ = ["StepResult", "train_step", "forward_step_func", "dp_mean", "last_stage_losses",
           "stage_data"]


def _masked_mean_loss(loss_mask: torch.Tensor, output: torch.Tensor):
    """Per-token losses ``[b, s]`` -> mean over unmasked tokens (+ a detached copy to log)."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(output.reshape(-1).float() * mask) / mask.sum().clamp(min=1)
    # clone: Megatron's schedule divides the returned loss by the micro-batch count in place
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(attention_mask: torch.Tensor, device: torch.device,
                  data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = cp_rank_share({k: v.to(device) for k, v in next(data_iterator).items()})
    output = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])
    return output, functools.partial(_masked_mean_loss, batch["loss_mask"])


def stage_data(batches: list[dict], num_chunks: int):
    """The schedule's ``data_iterator``: one iterator over the micro-batches per model chunk
    (the interleaved schedule reads each chunk's own), else one. Every stage reads the whole
    micro-batch: the first uses the tokens, the last the labels and loss mask."""
    return [iter(batches) for _ in range(num_chunks)] if num_chunks > 1 else iter(batches)


def forward_step_func(cfg: GroveConfig, device: torch.device):
    """Megatron's ``forward_step_func`` for this run: a micro-batch (``tokens``,
    ``position_ids``, ``labels``, ``loss_mask``, each ``[b, s]``) -> the per-token losses
    ``[b, s]`` and the loss function (mean over the unmasked tokens)."""
    # under CP, TE's causal attention masks each rank's share itself
    mask = (causal_attention_mask(cfg.model.seq_length, device)
            if cfg.parallel.context_parallel_size == 1 else None)
    return functools.partial(_forward_step, mask, device)


def last_stage_losses(outputs: list[dict], num_microbatches: int,
                      device: torch.device) -> torch.Tensor:
    """A schedule's ``"lm loss"`` values, ``[num_microbatches]`` fp32 on every rank: only the
    last pipeline stage computes them, so under pipeline parallelism they are broadcast from
    there over the pipeline group."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return torch.stack([d["lm loss"] for d in outputs])
    losses = (torch.stack([d["lm loss"] for d in outputs]).detach().float() if outputs
              else torch.zeros(num_microbatches, dtype=torch.float32, device=device))
    dist.broadcast(losses, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return losses


def _expert_load_of_all_stages(model_chunks: list[torch.nn.Module],
                               loads: list[torch.Tensor]) -> list[list[int]]:
    """This stage's tokens per expert (one ``[E]`` per router, as
    :func:`update_expert_bias` returns them) -> every layer's, over the pipeline stages
    (collective over the pipeline group), in layer order."""
    local = {router.layer_number: [int(x) for x in load.tolist()]
             for router, load in zip(training_routers(model_chunks), loads)}
    group = parallel_state.get_pipeline_model_parallel_group()
    stages: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(stages, local, group=group)
    merged = {number: load for stage in stages for number, load in stage.items()}
    return [merged[number] for number in sorted(merged)]


def dp_mean(value: torch.Tensor) -> float:
    """Collective over the data-parallel (x context-parallel) group: the mean of the 0-d
    ``value``."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    value = value.detach().clone()
    dist.all_reduce(value, group=group)
    return float(value) / dist.get_world_size(group)


@dataclass
class StepResult:
    """What one step did, the same on every rank (every pipeline stage's layers included)."""

    loss: float  # mean over micro-batches and data-parallel ranks (non-finite when skipped)
    grad_norm: float  # NaN when the step was skipped
    health: StepHealth  # what the ranks agreed on: finite or not, stop signals received
    expert_load: list[list[int]]  # tokens per expert ``[layers][E]`` of this step
    counters: dict[str, list[float]]  # MoE counters per token, one value per MoE layer
    elapsed_s: float  # wall time of the step on this rank


def train_step(setup: TrainingSetup, cfg: GroveConfig, step: int, forward_step,
               stop_signal: signal_module.Signals | None) -> StepResult:
    """Collective: run the 1-based ``step`` (its ``train.global_batch_size`` samples, this
    data-parallel rank's slice in micro-batches). ``stop_signal``: the stop signal this rank
    received so far (None if none), agreed on in the guard's collective."""
    t = cfg.train
    chunks, optimizer, scheduler = setup.model_chunks, setup.optimizer, setup.scheduler
    began = time.perf_counter()
    batches = micro_batches(setup.dataset, step, t.global_batch_size, t.micro_batch_size,
                            setup.dp_rank, setup.dp_size)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reset_moe_counters(chunks)
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=stage_data(batches, len(chunks)),
        model=chunks, num_microbatches=len(batches), seq_length=cfg.model.seq_length,
        micro_batch_size=t.micro_batch_size, forward_only=False)
    local_loss = last_stage_losses(outputs, len(batches), setup.runtime.device).mean()
    health = step_health(local_loss, chunks, stop_signal)  # all ranks agree
    grad_norm = math.nan
    if health.finite:
        _, norm, _ = optimizer.step()
        grad_norm = float(norm) if norm is not None else math.nan
        scheduler.step(increment=1)
        loads = update_expert_bias(chunks, cfg.moe.bias_update_rule, cfg.moe.bias_update_rate)
    else:  # skipped: no weight, Adam, LR or expert-bias update; loads still counted
        loads = update_expert_bias(chunks, "none", 0.0)
    loss = dp_mean(local_loss)
    elapsed = time.perf_counter() - began
    counters = collect_moe_counters(chunks, t.global_batch_size * cfg.model.seq_length)
    return StepResult(loss=loss, grad_norm=grad_norm, health=health,
                      expert_load=_expert_load_of_all_stages(chunks, loads),
                      counters=counters, elapsed_s=elapsed)
