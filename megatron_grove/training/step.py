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
from megatron_grove.training.loss import masked_token_loss, reduce_step_loss
from megatron_grove.training.nonfinite import StepHealth, step_health
from megatron_grove.training.setup import TrainingSetup

__all__ = ["StepResult", "train_step", "forward_step_func", "last_stage_losses", "stage_data"]


def _forward_step(attention_mask: torch.Tensor, device: torch.device,
                  data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = cp_rank_share({k: v.to(device) for k, v in next(data_iterator).items()})
    # chat data brings its own (per-conversation) masks; plain data uses the causal one
    attention_mask = batch.get("attention_mask", attention_mask)
    output = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])
    return output, functools.partial(masked_token_loss, batch["loss_mask"])


def stage_data(batches: list[dict], num_chunks: int):
    """The schedule's ``data_iterator``: one iterator over the micro-batches per model chunk
    (the interleaved schedule reads each chunk's own), else one. Every stage reads the whole
    micro-batch: the first uses the tokens, the last the labels and loss mask."""
    return [iter(batches) for _ in range(num_chunks)] if num_chunks > 1 else iter(batches)


def forward_step_func(cfg: GroveConfig, device: torch.device):
    """Megatron's ``forward_step_func`` for this run: a micro-batch (``tokens``,
    ``position_ids``, ``labels``, ``loss_mask``, each ``[b, s]``; chat data adds its
    ``attention_mask`` ``[b, 1, s, s]``, True = masked, used instead of the causal one) -> the
    per-token losses ``[b, s]`` and the loss function
    (:func:`~.loss.masked_token_loss`: loss sum and loss tokens)."""
    # under CP, TE's causal attention masks each rank's share itself
    mask = (causal_attention_mask(cfg.model.seq_length, device)
            if cfg.parallel.context_parallel_size == 1 else None)
    return functools.partial(_forward_step, mask, device)


def last_stage_losses(outputs: list[dict], num_microbatches: int,
                      device: torch.device) -> torch.Tensor:
    """A schedule's ``"lm loss"`` reports, ``[num_microbatches, 2]`` fp32 (loss sum, loss
    tokens; :func:`~.loss.masked_token_loss`) on every rank: only the last pipeline stage
    computes them, so under pipeline parallelism they are broadcast from there over the
    pipeline group (the loss tokens with them)."""
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return torch.stack([d["lm loss"] for d in outputs])
    reports = (torch.stack([d["lm loss"] for d in outputs]).detach().float() if outputs
               else torch.zeros(num_microbatches, 2, dtype=torch.float32, device=device))
    dist.broadcast(reports, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return reports


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


@dataclass
class StepResult:
    """What one step did, the same on every rank (every pipeline stage's layers included)."""

    loss: float  # the step's loss (:class:`~.loss.StepLoss`; non-finite when skipped)
    loss_tokens: int  # loss tokens of the global batch
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
    step_loss = reduce_step_loss(last_stage_losses(outputs, len(batches), setup.runtime.device),
                                 t.per_token_loss)
    health = step_health(step_loss.local, chunks, stop_signal)  # all ranks agree
    grad_norm = math.nan
    if health.finite:
        _, norm, _ = optimizer.step()
        grad_norm = float(norm) if norm is not None else math.nan
        scheduler.step(increment=1)
        loads = update_expert_bias(chunks, cfg.moe.bias_update_rule, cfg.moe.bias_update_rate)
    else:  # skipped: no weight, Adam, LR or expert-bias update; loads still counted
        loads = update_expert_bias(chunks, "none", 0.0)
    elapsed = time.perf_counter() - began
    counters = collect_moe_counters(chunks, t.global_batch_size * cfg.model.seq_length)
    return StepResult(loss=step_loss.value, loss_tokens=step_loss.tokens, grad_norm=grad_norm,
                      health=health, expert_load=_expert_load_of_all_stages(chunks, loads),
                      counters=counters, elapsed_s=elapsed)
