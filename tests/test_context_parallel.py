"""Context parallelism (``parallel.context_parallel_size``): the data split per CP rank as
Megatron expects it, and the one-line refusal on CPU (Megatron's CP needs TE attention)."""

import pytest
import torch

from processes import run_distributed
from megatron_grove.config import ConfigError, load_config
from megatron_grove.runtime.acceleration import resolve_acceleration


def _shares(rank):
    from megatron.core import parallel_state

    from megatron_grove.training.context_parallel import cp_rank_share

    seq = torch.arange(16).repeat(2, 1)  # [b=2, s=16], the same micro-batch on both CP ranks
    batch = {"tokens": seq, "labels": seq + 100, "loss_mask": torch.ones(2, 16),
             "position_ids": seq.clone()}
    share = cp_rank_share(batch)
    return (parallel_state.get_context_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
            {k: v.tolist() for k, v in share.items()})


def test_each_cp_rank_gets_megatrons_load_balanced_share():
    """CP=2: the 16 positions in 4 chunks, rank 0 chunks 0 and 3, rank 1 chunks 1 and 2; every
    field cut alike (labels, loss mask and position ids stay aligned with the tokens)."""
    results = run_distributed(_shares, world_size=2, context_parallel=2)
    expected = {0: [0, 1, 2, 3, 12, 13, 14, 15], 1: [4, 5, 6, 7, 8, 9, 10, 11]}
    for cp_rank, dp, share in results:
        assert dp == 1
        assert share["tokens"] == [expected[cp_rank]] * 2
        assert share["position_ids"] == share["tokens"]
        assert share["labels"] == [[t + 100 for t in expected[cp_rank]]] * 2
        assert share["loss_mask"] == [[1.0] * 8] * 2
    assert sorted(r[0] for r in results) == [0, 1]


def test_without_cp_the_batch_is_untouched():
    (cp_rank, _, share), = run_distributed(_shares, world_size=1)
    assert cp_rank == 0 and share["tokens"] == [list(range(16))] * 2


def test_cp_is_refused_on_cpu_in_one_line():
    cfg = load_config(None, ["parallel.context_parallel_size=2"])
    with pytest.raises(ConfigError) as err:
        resolve_acceleration(cfg, "cpu")
    assert str(err.value) == (
        "parallel.context_parallel_size=2 needs TransformerEngine attention on a GPU (Megatron's "
        "context parallelism), but no GPU is in use; set parallel.context_parallel_size=1 or run "
        "on GPUs with the gpu extra")
