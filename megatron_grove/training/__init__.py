"""Pretraining: the loop (:mod:`.loop`: Megatron DDP, optimizer, LR schedule, forward/backward
schedule), its data (:mod:`.data`: training and validation datasets, micro-batches), validation
(:mod:`.validation`), model FLOPs and throughput (:mod:`.flops`), its per-step metrics
(:mod:`.metrics`: ``metrics.jsonl`` + TensorBoard) and what keeps long runs safe: pre-flight
checks (:mod:`.preflight`), the choice of where a run starts (:mod:`.resume`), the non-finite
guard (:mod:`.nonfinite`) and preemption by signals (:mod:`.preemption`)."""

from megatron_grove.training.data import micro_batches
from megatron_grove.training.loop import (
    TrainingSetup,
    TrainSummary,
    freeze_untrainable,
    setup_training,
    train,
)

__all__ = ["TrainingSetup", "TrainSummary", "setup_training", "train", "micro_batches",
           "freeze_untrainable"]
