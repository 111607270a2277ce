"""Model FLOPs per token against a hand count of the tiny model, the Grove counters they are
built on against the routing that really ran (also under recompute and tensor parallelism),
and the throughput record (TFLOP/s per device, MFU, peaks)."""

import pytest
import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_grove.config import load_config
from megatron_grove.model import causal_attention_mask
from megatron_grove.moe.counters import collect_moe_counters, reset_moe_counters
from megatron_grove.moe.router import GroveTopKRouter
from megatron_grove.runtime import current_runtime
from megatron_grove.training import flops, micro_batches, setup_training
from megatron_grove.training.flops import forward_flops_per_token, peak_tflops, throughput_record
from processes import TINY, run_distributed


def test_tiny_model_forward_flops_equal_the_hand_count():
    """configs/tiny_cpu.yaml: 2 layers, hidden 128, 4 query heads and 2 KV heads of 32,
    sequences of 128, 8 experts (FFN 128) top-2, 4 groups with adjugates of FFN 32, vocabulary
    4096 (already a multiple of 1024, so not padded)."""
    cfg = load_config(TINY)
    qkv = 128 * (4 * 32 + 2 * 2 * 32) * 2            # 65,536
    out_proj = 4 * 32 * 128 * 2                       # 32,768
    scores_values = 129 / 2 * (4 * 32 * 2) * 2        # 33,024: 64.5 keys on average, QK^T + AV
    router = 128 * 8 * 2                              # 2,048
    experts = 2 * 3 * 128 * 128 * 2                   # 196,608: 2 experts, gate/up/down
    output = 128 * 4096 * 2                           # 1,048,576
    adjugate_rows = [1.75, 1.5]                       # (token, group) rows per token per layer
    adjugates = sum(adjugate_rows) * 3 * 128 * 32 * 2  # 79,872
    hand = 2 * (qkv + out_proj + scores_values + router + experts) + adjugates + output
    assert hand == 1_788_416

    counted = forward_flops_per_token(cfg, 4096, [2.0, 2.0], adjugate_rows)
    assert counted.total == hand
    assert counted.attention == 2 * (qkv + out_proj + scores_values)
    assert (counted.routed_experts, counted.adjugates, counted.output_layer) == \
        (2 * experts, adjugates, output)
    assert counted.dense_mlp == counted.shared_experts == 0

    record = throughput_record(cfg, 4096, {"routed_evals_per_token": [2.0, 2.0],
                                           "adjugate_evals_per_token": adjugate_rows},
                               elapsed_s=0.5, world_size=2, peak=None)
    assert record["model_flops_per_token"] == 3 * hand
    assert record["tokens_per_s"] == 8 * 128 / 0.5
    assert record["tflops_per_device"] == pytest.approx(3 * hand * 8 * 128 / 0.5 / 2 / 1e12)
    assert "mfu" not in record  # no peak (CPU): MFU is left out


def test_dense_layers_shared_experts_and_cmoe_router_are_counted():
    cfg = load_config(TINY, ["moe.first_k_dense_layers=1", "moe.num_expert_groups=0",
                             "moe.shared_expert_ffn_hidden_size=64"])
    counted = forward_flops_per_token(cfg, 4096)  # one MoE layer, k rows per token (dropless)
    assert counted.dense_mlp == 3 * 128 * 512 * 2
    assert counted.routed_experts == 2 * 3 * 128 * 128 * 2
    assert counted.shared_experts == 3 * 128 * 64 * 2 and counted.adjugates == 0
    assert counted.router == 128 * 8 * 2
    cmoe = load_config(TINY, ["moe.router_type=cmoe", "moe.num_expert_groups=0"])
    assert forward_flops_per_token(cmoe, 4096).router == 2 * (128 * 8 * 2) * 2  # gate + up rows
    with pytest.raises(ValueError, match="one count per MoE layer"):
        forward_flops_per_token(cfg, 4096, [2.0, 2.0])


def test_peak_and_mfu(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert peak_tflops(None, cpu) is None
    assert peak_tflops(500.0, cpu) == 500.0
    for name, peak in [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5),
                       ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("NVIDIA GeForce RTX 4090", None)]:
        monkeypatch.setattr(flops.torch.cuda, "get_device_name", lambda device, n=name: n)
        assert peak_tflops(None, cuda) == peak, name
    cfg = load_config(TINY)
    record = throughput_record(cfg, 4096, {}, elapsed_s=1.0, world_size=1, peak=100.0)
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 100.0)


SMALL = ["model.seq_length=16", "model.hidden_size=32", "model.num_attention_heads=2",
         "model.num_query_groups=1", "model.ffn_hidden_size=64", "moe.ffn_hidden_size=32",
         "train.iters=4", "train.lr_warmup_iters=1", "train.global_batch_size=4",
         "train.micro_batch_size=2", "train.eval_iters=0"]


def _one_step_counters(rank, overrides):
    """One training step's forward + backward of the tiny Grove model: the collected counters
    and the (token, expert) and (token, group) pairs its routers really chose."""
    cfg = load_config(TINY, SMALL + list(overrides))
    setup = setup_training(cfg, current_runtime(torch.device("cpu")))
    chosen = {"experts": 0, "groups": 0}

    def count(module, args, output):
        routing_map = output[1]  # [tokens, E] bool
        if torch.is_grad_enabled():  # not the no-grad first pass of a recomputed layer
            groups = routing_map.reshape(routing_map.shape[0], 4, 2).any(-1)
            chosen["experts"] += int(routing_map.sum())
            chosen["groups"] += int(groups.sum())

    for module in setup.model.modules():
        if isinstance(module, GroveTopKRouter):
            module.register_forward_hook(count)
    batches = micro_batches(setup.dataset, 1, 4, 2, setup.dp_rank, setup.dp_size)
    mask = causal_attention_mask(16, torch.device("cpu"))

    def forward_step(iterator, model):
        batch = next(iterator)
        output = model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
        return output, lambda out: (out.mean(), {"lm loss": out.mean().detach()})

    reset_moe_counters(setup.model)
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches),
                                model=[setup.model], num_microbatches=len(batches),
                                seq_length=16, micro_batch_size=2, forward_only=False)
    totals = torch.tensor([chosen["experts"], chosen["groups"]], dtype=torch.float64)
    torch.distributed.all_reduce(totals)  # sequence parallel: each TP rank routes its own tokens
    return collect_moe_counters(setup.model, 4 * 16), (totals / (4 * 16)).tolist()


@pytest.mark.parametrize("overrides, world, tp", [
    ([], 1, 1),
    (["parallel.recompute_granularity=full", "parallel.recompute_num_layers=1"], 1, 1),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"], 2, 2),
], ids=["plain", "full-recompute", "tp2"])
def test_counters_are_what_the_routers_chose(overrides, world, tp):
    """routed_evals_per_token and adjugate_evals_per_token (the FLOP count's inputs) equal the
    (token, expert) and (token, group) pairs the routers chose, summed over both MoE layers:
    once per forward under full recompute, once per tensor-parallel group under TP."""
    results = run_distributed(_one_step_counters, world_size=world, tensor_parallel=tp,
                              args=(["parallel.expert_model_parallel_size=1", *overrides],))
    counters, (experts, groups) = results[0]
    assert sum(counters["routed_evals_per_token"]) == pytest.approx(experts) == 2 * 2
    assert sum(counters["adjugate_evals_per_token"]) == pytest.approx(groups)
    assert 2 * 1 <= groups <= 2 * 2  # 1..k groups per token and layer
