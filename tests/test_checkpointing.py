"""Atomic checkpointing: a rank killed in the middle of a save leaves the previous checkpoint
as the latest loadable one, and the next save cleans up."""

import os
from pathlib import Path

import pytest
import torch

from helpers import run_distributed
from megatron_grove.checkpointing import (
    CheckpointError,
    TrainState,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
)
from megatron_grove.config import load_config
from megatron_grove.runtime import current_runtime
from megatron_grove.training import setup_training

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.seq_length=16", "model.hidden_size=32", "model.num_attention_heads=2",
         "model.num_query_groups=1", "model.ffn_hidden_size=64", "moe.ffn_hidden_size=32",
         "train.iters=4", "train.lr_warmup_iters=1", "parallel.expert_model_parallel_size=2"]


def _setup():
    """Model + optimizer after one (zero-gradient) optimizer step, so Adam state exists."""
    setup = setup_training(load_config(TINY, SMALL), current_runtime(torch.device("cpu")))
    setup.model.zero_grad_buffer()
    setup.optimizer.step()
    return setup.model, setup.optimizer


def _state(step):
    return TrainState(step=step, consumed_samples=8 * step, scheduler={}, config={})


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _save_then_die_during_second_save(rank, root):
    model, optimizer = _setup()
    save_checkpoint(root, model, optimizer, _state(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if rank == 1:  # dies after writing its shards, before the checkpoint is published
        torch.save = lambda *a, **k: os._exit(9)
    save_checkpoint(root, model, optimizer, _state(2))


def _load_then_save(rank, root):
    model, optimizer = _setup()
    before = _weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.0)
    state = load_checkpoint(root, model, optimizer)
    after = _weights(model)
    save_checkpoint(root, model, optimizer, _state(2))
    return state.step, all(torch.equal(before[k], after[k]) for k in before)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    with pytest.raises(Exception):
        run_distributed(_save_then_die_during_second_save, world_size=2, expert_parallel=2,
                        args=(str(root),), timeout_s=120)
    assert latest_iteration(root) == 1
    assert (root / ".iter_0000002.tmp").is_dir() and not (root / "iter_0000002").exists()

    # a fresh job resumes from step 1 with exactly the saved weights (the same seed builds the
    # same initial weights, so "equal to a fresh build" means "the step-1 weights"), then saves
    results = run_distributed(_load_then_save, world_size=2, expert_parallel=2, args=(str(root),))
    assert results == [(1, True), (1, True)]
    assert latest_iteration(root) == 2 and not list(root.glob(".iter_*.tmp"))


def test_load_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="no latest_checkpointed_iteration.txt"):
        load_checkpoint(tmp_path, model=None, optimizer=None)
