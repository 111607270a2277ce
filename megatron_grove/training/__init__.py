"""Pretraining: the run's model, optimizer and LR schedule (:mod:`.setup`), one step
(:mod:`.step`: forward/backward schedule, non-finite guard, optimizer, MoE counters), the loop
around it (:mod:`.loop`: validation, logging, saving, stopping), its data (:mod:`.data`:
training and validation datasets, micro-batches), validation (:mod:`.validation`), model
FLOPs and throughput (:mod:`.flops`), its per-step metrics (:mod:`.metrics`:
``metrics.jsonl`` + TensorBoard) and what keeps long runs safe: pre-flight checks
(:mod:`.preflight`), the choice of where a run starts (:mod:`.resume`), the non-finite guard
(:mod:`.nonfinite`) and preemption by signals (:mod:`.preemption`)."""

from megatron_grove.training.data import micro_batches
from megatron_grove.training.loop import TrainSummary, train
from megatron_grove.training.setup import TrainingSetup, freeze_untrainable, setup_training
from megatron_grove.training.step import StepResult, train_step

__all__ = ["TrainingSetup", "TrainSummary", "StepResult", "setup_training", "train",
           "train_step", "micro_batches", "freeze_untrainable"]
