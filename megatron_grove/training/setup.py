"""What a training run holds: model (Megatron DDP), optimizer, LR schedule and datasets.

:func:`setup_training` builds them on this rank from the one :class:`GroveConfig`; the step
(:mod:`.step`) and the loop (:mod:`.loop`) only use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_grove.config import GroveConfig, validate_layout
from megatron_grove.data.tokenizer import load_tokenizer
from megatron_grove.megatron_config import (
    TORCH_DTYPES,
    GroveTransformerConfig,
    to_transformer_config,
)
from megatron_grove.model import build_gpt_model, padded_vocab_size
from megatron_grove.runtime import ParallelRuntime
from megatron_grove.runtime.acceleration import resolve_acceleration
from megatron_grove.training.data import build_training_data

__all__ = ["TrainingSetup", "setup_training", "freeze_untrainable"]


def freeze_untrainable(model_chunks: list[torch.nn.Module], trainable: str) -> None:
    """``train.trainable``: 'all', or 'router' (only the MoE routers' parameters get gradients,
    e.g. a carved CMoE model's router scale). Call before wrapping in DDP."""
    if trainable == "all":
        return
    for model in model_chunks:
        for name, param in model.named_parameters():
            param.requires_grad_(".router." in name)
    if not any(p.requires_grad for model in model_chunks for p in model.parameters()):
        raise ValueError(f"train.trainable={trainable}: the model (this pipeline stage) has no "
                         "such parameters")


def _build_optimizer(cfg: GroveConfig, model_chunks: list[torch.nn.Module], dtype: torch.dtype):
    t = cfg.train
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                        adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
                        clip_grad=t.clip_grad, bf16=dtype == torch.bfloat16, params_dtype=dtype,
                        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer),
        model_chunks)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=t.iters, lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay,
        end_wd=t.weight_decay, wd_incr_steps=t.iters, wd_incr_style="constant")
    return optimizer, scheduler


def _vp_stages(cfg: GroveConfig) -> list[int | None]:
    """The model chunks a rank builds: Megatron's virtual stage indices, or [None]."""
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    return list(range(vpp)) if vpp else [None]


@dataclass
class TrainingSetup:
    """Everything a training run holds; built by :func:`setup_training`."""

    runtime: ParallelRuntime
    dp_size: int
    dp_rank: int
    tconfig: GroveTransformerConfig
    model_chunks: list[DistributedDataParallel]  # this rank's model: one chunk, or one per
    # virtual pipeline stage (interleaved schedule), in layer order
    optimizer: Any
    scheduler: OptimizerParamScheduler
    dataset: Any  # training samples (Megatron GPTDataset / BlendedDataset)
    valid_dataset: Any  # validation samples, or None
    data_summary: list[str]  # what the datasets hold, printed at start
    padded_vocab_size: int  # the model's (padded) vocabulary

    @property
    def model(self) -> DistributedDataParallel:
        """The model of a run with one chunk per rank (no virtual pipeline stages)."""
        if len(self.model_chunks) != 1:
            raise ValueError(f"this run has {len(self.model_chunks)} model chunks per rank "
                             "(parallel.virtual_pipeline_model_parallel_size): use model_chunks")
        return self.model_chunks[0]


def setup_training(cfg: GroveConfig, runtime: ParallelRuntime) -> TrainingSetup:
    """Build data, model (this rank's pipeline stage, each chunk wrapped in Megatron DDP),
    optimizer and LR schedule on this rank."""
    dp_size = validate_layout(cfg, runtime.world_size)
    dtype = TORCH_DTYPES[cfg.runtime.dtype]
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    data = build_training_data(cfg, tokenizer)
    vocab_size = cfg.model.vocab_size or tokenizer.vocab_size
    tconfig = to_transformer_config(cfg, dtype, use_cpu_initialization=runtime.device.type == "cpu",
                                    acceleration=resolve_acceleration(cfg, runtime.device.type))
    chunks = [build_gpt_model(tconfig, vocab_size, cfg.model.seq_length, cfg.model.rotary_base,
                              cfg.model.tie_embeddings, seed=cfg.train.seed,
                              vp_stage=vp_stage).to(runtime.device)
              for vp_stage in _vp_stages(cfg)]
    freeze_untrainable(chunks, cfg.train.trainable)
    if dtype == torch.bfloat16:
        # Megatron's mixed-precision wrapper: every weight in bf16 (the torch norms too, which
        # Megatron's bf16 optimizer requires of the params it checkpoints), outputs in fp32;
        # the routers keep their fp32 expert bias (_maintain_float32_expert_bias).
        chunks = [Float16Module(tconfig, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    chunks = [DistributedDataParallel(config=tconfig, module=chunk, ddp_config=ddp_config)
              for chunk in chunks]
    optimizer, scheduler = _build_optimizer(cfg, chunks, dtype)
    tconfig.finalize_model_grads_func = finalize_model_grads
    tconfig.no_sync_func = ([chunk.no_sync for chunk in chunks] if len(chunks) > 1
                            else chunks[0].no_sync)
    padded = padded_vocab_size(vocab_size, cfg.parallel.tensor_model_parallel_size)
    return TrainingSetup(runtime=runtime, dp_size=dp_size,
                         dp_rank=parallel_state.get_data_parallel_rank(), tconfig=tconfig,
                         model_chunks=chunks, optimizer=optimizer, scheduler=scheduler,
                         dataset=data.train,
                         valid_dataset=data.valid, data_summary=data.summary,
                         padded_vocab_size=padded)
