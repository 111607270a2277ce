"""Validation: the loss on held-out data every ``train.eval_interval`` steps and after the last.

Each validation runs Megatron's forward-only schedule (``forward_only=True``, ``torch.no_grad``,
the model in eval mode) over the same ``train.eval_iters`` global batches: the first
``eval_iters * global_batch_size`` samples of the validation dataset, each data-parallel rank
reading its slice as in training. The loss is the training loss's definition
(:mod:`.loss`: with ``train.per_token_loss`` the mean over all loss tokens, else the mean over
micro-batches of the per-token mean, averaged over the data-parallel ranks), so it does not
depend on the expert-, tensor- or pipeline-parallel layout (the last stage computes it and
broadcasts it to the other stages). Nothing the training reads changes: the
routers count tokens for balancing only with gradients enabled, and the Grove counters are
reset at the start of every step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_grove.config import GroveConfig
from megatron_grove.training.data import micro_batches
from megatron_grove.training.step import last_stage_losses, stage_data

__all__ = ["validation_due", "validation_loss", "validation_record", "validation_line"]


def validation_due(cfg: GroveConfig, step: int, has_data: bool) -> bool:
    """Whether 1-based ``step`` ends with a validation: every ``train.eval_interval`` steps and
    after the last step (``train.iters``), when there is validation data."""
    t = cfg.train
    return has_data and t.eval_iters > 0 and (step % t.eval_interval == 0 or step == t.iters)


def validation_loss(cfg: GroveConfig, model_chunks: list[torch.nn.Module], dataset,
                    forward_step: Callable, dp_rank: int, dp_size: int) -> torch.Tensor:
    """This data-parallel rank's loss reports ``[micro-batches, 2]`` (loss sum, loss tokens),
    one row per micro-batch of every validation batch, on every pipeline stage (reduce them
    over the data-parallel group with :func:`megatron_grove.training.loss.reduce_step_loss`).
    ``forward_step`` is the training's forward step (Megatron's ``forward_step_func``)."""
    t = cfg.train
    forward_backward = get_forward_backward_func()
    losses = []
    for chunk in model_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            for batch in range(1, t.eval_iters + 1):
                batches = micro_batches(dataset, batch, t.global_batch_size, t.micro_batch_size,
                                        dp_rank, dp_size)
                out = forward_backward(forward_step_func=forward_step,
                                       data_iterator=stage_data(batches, len(model_chunks)),
                                       model=model_chunks, num_microbatches=len(batches),
                                       seq_length=cfg.model.seq_length,
                                       micro_batch_size=t.micro_batch_size, forward_only=True)
                losses.append(last_stage_losses(out, len(batches),
                                                next(model_chunks[0].parameters()).device))
    finally:
        for chunk in model_chunks:
            chunk.train()
    return torch.cat(losses)


def validation_record(loss: float) -> dict[str, float]:
    """The metrics of one validation: ``val_loss`` and ``val_ppl`` = exp(``val_loss``)."""
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0))}


def validation_line(step: int, iters: int, record: dict[str, float]) -> str:
    """The line printed after a validation."""
    return (f"validation at step {step}/{iters}: loss {record['val_loss']:.4f}, "
            f"perplexity {record['val_ppl']:.2f}")
