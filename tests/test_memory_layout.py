"""Distributed optimizer and activation recompute: really on in Megatron, same numbers as off."""

from pathlib import Path

import pytest
import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from megatron_grove.config import ConfigError, load_config
from megatron_grove.model import causal_attention_mask
from megatron_grove.runtime import current_runtime
from megatron_grove.training import micro_batches, setup_training
from processes import run_distributed

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
SMALL = ["model.seq_length=16", "model.hidden_size=32", "model.num_attention_heads=2",
         "model.num_query_groups=1", "model.ffn_hidden_size=64", "moe.ffn_hidden_size=32",
         "train.iters=4", "train.lr_warmup_iters=1", "train.global_batch_size=4",
         "train.micro_batch_size=2", "parallel.expert_model_parallel_size=1"]


def _setup(*overrides):
    cfg = load_config(TINY, SMALL + list(overrides))
    return cfg, setup_training(cfg, current_runtime(torch.device("cpu")))


def _optimizer_shards(rank, distributed):
    """Elements of optimizer main params this rank holds, per sub-optimizer, and the total."""
    _, setup = _setup(f"parallel.use_distributed_optimizer={str(distributed).lower()}")
    subs = setup.optimizer.chained_optimizers
    held = [sum(p.numel() for g in o.optimizer.param_groups for p in g["params"]) for o in subs]
    return [type(o).__name__ for o in subs], held, sum(p.numel() for p in setup.model.parameters())


def test_distributed_optimizer_shards_state_over_data_parallel_ranks():
    plain = run_distributed(_optimizer_shards, world_size=2, args=(False,))
    sharded = run_distributed(_optimizer_shards, world_size=2, args=(True,))
    assert all(t == "DistributedOptimizer" for t in sharded[0][0])
    total = plain[0][2]
    assert sum(plain[0][1]) == total  # every rank holds every main param
    # each of the 2 DP ranks holds its half (Megatron pads buckets, so about half)
    assert sum(sharded[0][1]) + sum(sharded[1][1]) == total
    assert abs(sum(sharded[0][1]) - total / 2) < 0.05 * total


def _forward_backward(rank, recompute):
    """One micro-batch forward + backward; returns the loss, the gradients and how often each
    transformer layer / core attention ran forward."""
    cfg, setup = _setup(*recompute)
    calls = {"layer": 0, "core_attention": 0}
    for module in setup.model.modules():
        if isinstance(module, TransformerLayer):
            module.register_forward_hook(lambda *a: calls.__setitem__("layer", calls["layer"] + 1))
    for module in setup.model.modules():
        if type(module).__name__ == "DotProductAttention":
            module.register_forward_hook(
                lambda *a: calls.__setitem__("core_attention", calls["core_attention"] + 1))
    batch = micro_batches(setup.dataset, 1, 4, 2, 0, 1)[0]
    mask = causal_attention_mask(cfg.model.seq_length, torch.device("cpu"))
    setup.model.zero_grad_buffer()
    loss = setup.model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"]).mean()
    loss.backward()
    grads = {n: p.main_grad.clone() for n, p in setup.model.named_parameters()}
    return float(loss), grads, calls


@pytest.mark.parametrize("recompute, layer_calls, attention_calls", [
    (["parallel.recompute_granularity=full", "parallel.recompute_num_layers=1"], 4, 4),
    (["parallel.recompute_granularity=selective"], 2, 4),
])
def test_recompute_reruns_forward_and_gives_identical_gradients(recompute, layer_calls,
                                                                attention_calls):
    (loss, grads, calls), = run_distributed(_forward_backward, world_size=1, args=([],))
    (loss_r, grads_r, calls_r), = run_distributed(_forward_backward, world_size=1,
                                                  args=(recompute,))
    assert calls == {"layer": 2, "core_attention": 2}  # 2 layers, no recompute
    assert calls_r == {"layer": layer_calls, "core_attention": attention_calls}
    assert loss_r == loss
    for name, grad in grads.items():
        assert torch.equal(grads_r[name], grad), name


def test_full_recompute_needs_a_layer_count_in_range():
    with pytest.raises(ConfigError, match="parallel.recompute_num_layers=3: allowed 1..model.num_layers=2"):
        load_config(TINY, ["parallel.recompute_granularity=full", "parallel.recompute_num_layers=3"])
