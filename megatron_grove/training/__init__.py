"""Pretraining: the loop (:mod:`.loop`: Megatron DDP, optimizer, LR schedule, forward/backward
schedule), its data (:mod:`.data`: training and validation datasets, micro-batches), validation
(:mod:`.validation`), model FLOPs and throughput (:mod:`.flops`) and its per-step metrics
(:mod:`.metrics`: ``metrics.jsonl`` + TensorBoard)."""

from megatron_grove.training.data import micro_batches
from megatron_grove.training.loop import (
                                          TrainingSetup,
                                          freeze_untrainable,
                                          resolve_checkpoint_load,
                                          setup_training,
                                          train,
)

__all__ = ["TrainingSetup", "setup_training", "train", "resolve_checkpoint_load",
           "micro_batches", "freeze_untrainable"]
