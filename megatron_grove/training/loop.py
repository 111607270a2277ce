"""The pretraining loop: Megatron's DDP, optimizer, LR schedule and forward/backward schedule.

One step = one global batch of ``train.global_batch_size`` sequences: each data-parallel rank
takes its contiguous slice, split into micro-batches of ``train.micro_batch_size``. The
samples of step ``s`` are fixed by the step number alone, so a resumed run sees exactly the
data an uninterrupted run would (:mod:`.data`). Validation (:mod:`.validation`) and the
throughput figures (:mod:`.flops`) are computed after the step and logged with it.
"""

from __future__ import annotations

import functools
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from tqdm import tqdm

from megatron_grove.config import GroveConfig, validate_layout
from megatron_grove.data.tokenizer import load_tokenizer
from megatron_grove.megatron_config import (
    TORCH_DTYPES,
    GroveTransformerConfig,
    to_transformer_config,
)
from megatron_grove.model import build_gpt_model, causal_attention_mask, padded_vocab_size
from megatron_grove.moe.balancing import update_expert_bias
from megatron_grove.moe.counters import collect_moe_counters, reset_moe_counters
from megatron_grove.runtime import ParallelRuntime, initialize_parallel
from megatron_grove.runtime.acceleration import resolve_acceleration
from megatron_grove.training.data import build_training_data, micro_batches
from megatron_grove.training.flops import peak_tflops, throughput_record
from megatron_grove.training.loss import masked_token_loss, reduce_step_loss
from megatron_grove.training.metrics import MetricsWriter
from megatron_grove.training.nonfinite import SkipCounter, step_health
from megatron_grove.training.preemption import Preempted, StopSignals
from megatron_grove.training.preflight import preflight
from megatron_grove.training.resume import choose_start, latest_checkpoint, load_start, save_step
from megatron_grove.training.validation import (
    validation_due,
    validation_line,
    validation_loss,
    validation_record,
)

__all__ = ["TrainingSetup", "TrainSummary", "setup_training", "train", "freeze_untrainable"]


def _forward_step(attention_mask: torch.Tensor, device: torch.device,
                  data_iterator: Iterator[dict], model: torch.nn.Module):
    batch = {k: v.to(device) for k, v in next(data_iterator).items()}
    # chat data brings its own (per-conversation) masks; plain data uses the causal one
    attention_mask = batch.get("attention_mask", attention_mask)
    output = model(batch["tokens"], batch["position_ids"], attention_mask, labels=batch["labels"])
    return output, functools.partial(masked_token_loss, batch["loss_mask"])


def freeze_untrainable(model: torch.nn.Module, trainable: str) -> None:
    """``train.trainable``: 'all', or 'router' (only the MoE routers' parameters get gradients,
    e.g. a carved CMoE model's router scale). Call before wrapping in DDP."""
    if trainable == "all":
        return
    for name, param in model.named_parameters():
        param.requires_grad_(".router." in name)
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"train.trainable={trainable}: the model has no such parameters")


def _build_optimizer(cfg: GroveConfig, model: torch.nn.Module, dtype: torch.dtype):
    t = cfg.train
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                        clip_grad=t.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer),
        [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.iters, wd_incr_style="constant")
    return optimizer, scheduler


@dataclass
class TrainingSetup:
    """Everything a training run holds; built by :func:`setup_training`."""

    runtime: ParallelRuntime
    dp_size: int
    dp_rank: int
    tconfig: GroveTransformerConfig
    model: DistributedDataParallel
    optimizer: Any
    scheduler: OptimizerParamScheduler
    dataset: Any  # training samples (Megatron GPTDataset / BlendedDataset)
    valid_dataset: Any  # validation samples, or None
    data_summary: list[str]  # what the datasets hold, printed at start
    padded_vocab_size: int  # the model's (padded) vocabulary


def setup_training(cfg: GroveConfig, runtime: ParallelRuntime) -> TrainingSetup:
    """Build data, model (wrapped in Megatron DDP), optimizer and LR schedule on this rank."""
    dp_size = validate_layout(cfg, runtime.world_size)
    dtype = TORCH_DTYPES[cfg.runtime.dtype]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = build_training_data(cfg, tokenizer)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    tconfig = to_transformer_config(cfg, dtype, use_cpu_initialization=runtime.device.type == "cpu",
                                    acceleration=resolve_acceleration(cfg, runtime.device.type))
    model = build_gpt_model(tconfig, vocab_size, cfg.model.seq_length, cfg.model.rotary_base,
                            cfg.model.tie_embeddings, seed=cfg.train.seed).to(runtime.device)
    freeze_untrainable(model, cfg.train.trainable)
    if dtype == torch.bfloat16:
        # Megatron's mixed-precision wrapper: every weight in bf16 (the torch norms too, which
        # Megatron's bf16 optimizer requires of the params it checkpoints), outputs in fp32;
        # the routers keep their fp32 expert bias (_maintain_float32_expert_bias).
        model = Float16Module(tconfig, model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    model = DistributedDataParallel(config=tconfig, module=model, ddp_config=ddp_config)
    optimizer, scheduler = _build_optimizer(cfg, model, dtype)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = model.no_sync
    return TrainingSetup(runtime=runtime, dp_size=dp_size,
                         dp_rank=parallel_state.get_data_parallel_rank(), tconfig=tconfig,
                         model=model, optimizer=optimizer, scheduler=scheduler, dataset=data.train,
                         valid_dataset=data.valid, data_summary=data.summary,
                         padded_vocab_size=padded_vocab_size(vocab_size,
                                                             cfg.parallel.tensor_model_parallel_size))


@dataclass
class TrainSummary:
    """What :func:`train` did: steps run by this call, first and last finite losses, steps
    skipped as non-finite, the step of its last checkpoint (None: it saved none) and the
    record of its last validation (None: none ran)."""

    steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    skipped: int = 0
    last_saved: int | None = None
    last_validation: dict[str, Any] | None = None

    def count(self, loss: float) -> None:
        self.steps += 1
        if math.isfinite(loss):
            self.first_loss = loss if self.first_loss is None else self.first_loss
            self.last_loss = loss


def train(cfg: GroveConfig, stop: StopSignals | None = None) -> TrainSummary:
    """Run the configured training (collective); ``stop``: the process's stop-signal handlers
    (installed by the caller), which end the run after the step every rank has seen a signal
    by. Raises, alike on every rank:
    :class:`~megatron_grove.training.preflight.PreflightError` (before anything is built),
    :class:`CheckpointError`, :class:`NonFiniteError` (too many non-finite steps in a row) and
    :class:`Preempted` (a stop signal; after its checkpoint)."""
    p, t = cfg.parallel, cfg.train
    runtime = initialize_parallel(p.tensor_model_parallel_size, p.expert_model_parallel_size,
                                  p.pipeline_model_parallel_size, seed=t.seed,
                                  device=cfg.runtime.device, timeout_s=cfg.runtime.dist_timeout_s)
    is_first = runtime.rank == 0
    preflight(cfg, runtime.rank)
    start_point = choose_start(cfg)
    for note in start_point.notes if is_first else []:
        print(note, file=sys.stderr, flush=True)
    setup = setup_training(cfg, runtime)
    model, optimizer, scheduler = setup.model, setup.optimizer, setup.scheduler
    dataset, dp_rank, dp_size = setup.dataset, setup.dp_rank, setup.dp_size
    device = runtime.device

    start, last_saved = load_start(start_point, model, optimizer, scheduler, cfg, is_first)
    if start_point.folder and is_first:
        print(f"resumed from checkpoint step {start} in {start_point.folder.resolve()}",
              flush=True)
    if start >= t.iters and is_first:
        print(f"checkpoint is at step {start} >= train.iters={t.iters}: nothing to train")
    if is_first:
        print("\n".join(setup.data_summary), flush=True)

    metrics = MetricsWriter(cfg.logging.dir, enabled=is_first,
                            tensorboard=cfg.logging.tensorboard, resume_step=start)
    if metrics.set_aside:
        print(f"logging.dir: this run starts at step 1; the earlier {metrics.path.name} was "
              f"moved to {metrics.set_aside}", flush=True)
    peak = peak_tflops(cfg.logging.peak_tflops, device)
    mask = causal_attention_mask(cfg.model.seq_length, device)
    forward_step = functools.partial(_forward_step, mask, device)
    forward_backward = get_forward_backward_func()
    bar = tqdm(total=t.iters, initial=start, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (is_first and cfg.logging.progress_bar))
    summary = TrainSummary()
    skips = SkipCounter(t.max_skipped_steps)
    for step in range(start + 1, t.iters + 1):
        began = time.perf_counter()
        batches = micro_batches(dataset, step, t.global_batch_size, t.micro_batch_size,
                                dp_rank, dp_size)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        reset_moe_counters(model)
        losses = forward_backward(forward_step_func=forward_step, data_iterator=iter(batches),
                                  model=[model], num_microbatches=len(batches),
                                  seq_length=cfg.model.seq_length,
                                  micro_batch_size=t.micro_batch_size, forward_only=False)
        step_loss = reduce_step_loss(losses, t.per_token_loss)
        health = step_health(step_loss.local, model, stop and stop.received)  # all ranks agree
        grad_norm = None
        if health.finite:
            _, grad_norm, _ = optimizer.step()
            scheduler.step(increment=1)
            expert_load = update_expert_bias([model], cfg.moe.bias_update_rule,
                                             cfg.moe.bias_update_rate)
        else:  # skipped: no weight, Adam, LR or expert-bias update; loads still counted
            expert_load = update_expert_bias([model], "none", 0.0)
        loss = step_loss.value
        elapsed = time.perf_counter() - began
        counters = collect_moe_counters(model, t.global_batch_size * cfg.model.seq_length)
        record = {
            "step": step, "loss": loss, "lr": scheduler.get_lr(optimizer.param_groups[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else math.nan,
            "step_time_s": elapsed, "skipped": not health.finite, "loss_tokens": step_loss.tokens,
            **throughput_record(cfg, setup.padded_vocab_size, counters, elapsed,
                                runtime.world_size, peak),
            "expert_load": [[int(x) for x in layer.tolist()] for layer in expert_load],
            **counters,
        }
        if validation_due(cfg, step, setup.valid_dataset is not None):
            val_loss = reduce_step_loss(validation_loss(
                cfg, model, setup.valid_dataset, forward_step, dp_rank, dp_size), t.per_token_loss)
            record.update(validation_record(val_loss.value), val_loss_tokens=val_loss.tokens)
            summary.last_validation = record
            if is_first:
                bar.write(validation_line(step, t.iters, record))
        summary.count(loss)
        if (step % cfg.logging.log_interval == 0 or step == t.iters or not health.finite
                or "val_loss" in record):
            metrics.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        tflops=f"{record['tflops_per_device']:.3g}",
                        **({"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}))
        bar.update(1)
        note = skips.after_step(step, health, latest_checkpoint(cfg, last_saved))
        if note and is_first:
            tqdm.write(note, file=sys.stderr)
        stopping = step == t.iters or step == t.exit_at_iter or bool(health.stop_requested)
        interval = cfg.checkpoint.save_interval
        if (cfg.checkpoint.save and health.finite
                and (stopping or (interval and step % interval == 0))):
            save_step(cfg, model, optimizer, scheduler, step, latest_checkpoint(cfg, last_saved))
            last_saved = step
        if health.stop_requested:
            raise Preempted(health.stop_requested, step,
                            latest_checkpoint(cfg, last_saved) if cfg.checkpoint.save else None)
        if stopping:
            break
    bar.close()
    metrics.close()
    summary.skipped = skips.total
    summary.last_saved = last_saved if last_saved != start else None
    if is_first and summary.last_saved is not None:
        print(f"saved checkpoint step {last_saved} to {Path(cfg.checkpoint.save).resolve()}")
    return summary
