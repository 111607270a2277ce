"""Expert tensor parallelism decoupled from attention's (``parallel.expert_tensor_parallel_size``,
Megatron's): TP=2 attention with ETP=1 whole experts, the group-aware dispatcher under it."""

from __future__ import annotations

import pytest
from grove_layer_cases import (
    ALL_KEYS,
    CASES,
    FORCED_NAMES,
    assert_matches,
    forced_run,
    grove_run,
    reference_of,
    run_layers,
)
from processes import losses, run_distributed, torchrun

from megatron_grove.config import ConfigError, load_config, validate_layout


@pytest.mark.parametrize("world, ep", ((2, 2), (2, 1), (4, 4)))
def test_layer_at_tp2_etp1_matches_the_reference(world, ep):
    """The Grove layer with TP=2 (sequence parallel) attention ranks and ETP=1 experts (whole
    experts on EP ranks, replicated over expert-DP when EP < world): outputs and input, router,
    expert and adjugate gradients equal the plain-torch (TP=1) reference to 1e-5, with the
    group-aware and the stock all-to-all, including an EP rank that receives no tokens."""
    runs = [grove_run(case, d) for case in CASES if case.groups % ep == 0
            for d in ("grove_alltoall", "alltoall")]
    runs += [forced_run(name, d) for name in FORCED_NAMES for d in ("grove_alltoall", "alltoall")]
    results = run_layers(runs, ep=ep, world_size=world, tp=2, etp=1)
    for run, result in zip(runs, results):
        assert_matches(result, reference_of(run)[0], ALL_KEYS, rel=1e-5)


def _expert_groups(rank: int) -> dict:
    from megatron.core import parallel_state as ps

    return {"tp": ps.get_tensor_model_parallel_world_size(),
            "etp": ps.get_expert_tensor_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "ep_rank": ps.get_expert_model_parallel_rank(),
            "edp": ps.get_expert_data_parallel_world_size()}


def test_megatron_groups_follow_the_config():
    """initialize_parallel hands expert_tensor_parallel to Megatron: at 4 ranks, TP=2 x ETP=1 x
    EP=4 puts every rank in one EP group of 4 while attention is split over pairs."""
    groups = run_distributed(_expert_groups, world_size=4, tensor_parallel=2, expert_parallel=4,
                             expert_tensor_parallel=1)
    assert [g["ep_rank"] for g in groups] == [0, 1, 2, 3]
    assert {(g["tp"], g["etp"], g["ep"], g["edp"]) for g in groups} == {(2, 1, 4, 1)}


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
      "parallel.expert_tensor_parallel_size=1", "parallel.expert_model_parallel_size=4",
      "moe.num_expert_groups=4", "moe.adjugate_scale=0.5"], 4, None),
    (["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
      "parallel.expert_tensor_parallel_size=1", "parallel.expert_model_parallel_size=8"], 4,
     "parallel.expert_model_parallel_size=8: must divide world size 4 / "
     "(expert_tensor_parallel_size 1 x pp 1) = 4; allowed: 1, 2, 4"),
])
def test_layout_validation_with_etp(overrides, world, needle):
    cfg = load_config(None, overrides)
    if needle is None:
        assert validate_layout(cfg, world) == world // 2
        return
    with pytest.raises(ConfigError) as err:
        validate_layout(cfg, world)
    assert needle in str(err.value)


def test_etp_must_be_positive():
    with pytest.raises(ConfigError, match="parallel.expert_tensor_parallel_size=0: must be >= 1 "
                                          "or null"):
        load_config(None, ["parallel.expert_tensor_parallel_size=0"])


@pytest.mark.e2e
def test_checkpoint_at_tp2_etp1_reshards(tmp_path):
    """4 processes, TP=2 (sequence parallel) x ETP=1 x EP=4 with the group-aware dispatcher,
    saved at step 3 (optimizer included) and resumed for steps 4-6 at ETP=2 x EP=2 (experts
    re-spread over half the EP ranks and split over the TP pair): the losses of the run that
    kept its layout, to 1e-6."""
    common = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
              "train.iters=6", "moe.num_expert_groups=4"]
    save, straight, resumed_log = tmp_path / "ckpt", tmp_path / "straight", tmp_path / "resumed"
    torchrun(*common, "parallel.expert_tensor_parallel_size=1",
             "parallel.expert_model_parallel_size=4", f"logging.dir={straight}",
             f"checkpoint.save={save}", "checkpoint.save_interval=3", nproc=4)
    torchrun(*common, "parallel.expert_tensor_parallel_size=2",
             "parallel.expert_model_parallel_size=2", f"logging.dir={resumed_log}",
             f"checkpoint.load={save}/iter_0000003", f"checkpoint.save={tmp_path / 'c2'}", nproc=4)
    ours, resumed = losses(straight), losses(resumed_log)
    assert ours.keys() == set(range(1, 7)) and resumed.keys() == {4, 5, 6}
    for step in resumed:
        assert resumed[step] == pytest.approx(ours[step], rel=1e-6, abs=0), (resumed, ours)
