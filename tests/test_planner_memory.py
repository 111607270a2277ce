"""The planner's activation estimate against the bytes autograd really saves (tiny model, CPU),
and its memory arithmetic for the layout knobs."""

from pathlib import Path

import pytest
import torch

from megatron_grove.config import load_config
from megatron_grove.model import causal_attention_mask
from megatron_grove.planner import plan_memory, plan_parameters
from megatron_grove.runtime import current_runtime
from megatron_grove.training import micro_batches, setup_training
from processes import run_distributed

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny_cpu.yaml"
# alltoall: the estimate's per-copy terms are those of Megatron's dispatcher; the group-aware
# one keeps more for backward (tiny model: 16.15 MB saved against 14.87 MB, estimate 12.65 MB)
SHAPE = ["parallel.expert_model_parallel_size=1", "train.global_batch_size=2",
         "train.micro_batch_size=2", "model.vocab_size=4096", "train.iters=2",
         "train.lr_warmup_iters=0", "moe.token_dispatcher_type=alltoall"]


def _saved_bytes(rank, overrides):
    """Bytes of distinct non-parameter tensors autograd saves in one micro-batch's forward,
    and the planner's activation estimate for the same config."""
    cfg = load_config(TINY, SHAPE + overrides)
    setup = setup_training(cfg, current_runtime(torch.device("cpu")))
    params = {p.data_ptr() for p in setup.model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    batch = micro_batches(setup.dataset, 1, 2, 2, 0, 1)[0]
    mask = causal_attention_mask(cfg.model.seq_length, torch.device("cpu"))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = setup.model(batch["tokens"], batch["position_ids"], mask, labels=batch["labels"])
    loss.mean().backward()
    estimate = plan_memory(cfg, plan_parameters(cfg), world_size=1).activation_bytes
    return sum(seen.values()), estimate


@pytest.mark.parametrize("overrides", [[], ["parallel.recompute_granularity=selective"]])
def test_activation_estimate_is_close_to_the_saved_tensors(overrides):
    (measured, estimate), = run_distributed(_saved_bytes, world_size=1, args=(overrides,))
    print(f"activations: measured {measured} B, estimated {estimate} B, "
          f"ratio {estimate / measured:.3f}")
    # measured here: the estimate is 15% below the saved bytes (13% before the adjugate bank's
    # grouped GEMM, which saves the stacked weights)
    assert 0.8 * measured < estimate <= measured
