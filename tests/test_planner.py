"""--dry-run: parameter accounting of the real model built on the meta device."""

import json

import pytest

from processes import ROOT, run_script

pytestmark = pytest.mark.e2e  # every test runs launch/pretrain_grove.py --dry-run


def dry_run(config: str, *overrides: str) -> dict:
    proc = run_script("launch/pretrain_grove.py", "--config", str(ROOT / "configs" / config),
                      "--dry-run", "--json", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "activated per token (min)" in proc.stdout
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_grovemoe_33b_matches_the_released_model():
    plan = dry_run("grovemoe_33b_a3b.yaml")
    assert 32.5e9 < plan["total_params"] < 33.5e9  # "~33B total"
    # one adjugate: SwiGLU 2048 -> 128 -> 2048; one routed expert: 2048 -> 768 -> 2048
    assert plan["params_per_adjugate"] == 3 * 2048 * 128
    assert plan["params_per_expert"] == 3 * 2048 * 768
    assert (plan["groups_hit_min"], plan["groups_hit_max"]) == (4, 8)
    width = plan["activated_params_max"] - plan["activated_params_min"]
    assert width == 4 * 48 * 3 * 2048 * 128  # 4 groups x 48 layers of adjugate weights
    assert plan["adjugate_params"] == 48 * 64 * 3 * 2048 * 128
    # EP=8 keeps 1/8 of the experts and adjugates per rank, all dense weights, bf16
    expected = plan["dense_params"] + (plan["routed_expert_params"] + plan["adjugate_params"]) // 8
    assert plan["params_per_rank"] == expected
    assert plan["param_bytes_per_rank"] == 2 * expected


def test_fewer_groups_widen_the_activated_range():
    g16 = dry_run("grovemoe_33b_g16.yaml")
    assert (g16["groups_hit_min"], g16["groups_hit_max"]) == (1, 8)
    assert g16["activated_params_max"] - g16["activated_params_min"] == 7 * 48 * 3 * 2048 * 128


def test_plain_moe_has_no_adjugates():
    plan = dry_run("tiny_cpu.yaml", "moe.num_expert_groups=0")
    assert plan["adjugate_params"] == 0
    assert plan["activated_params_min"] == plan["activated_params_max"]


def test_memory_plan_of_the_8_node_recipe():
    plan = dry_run("grovemoe_33b_a3b.yaml", "--world-size", "64")
    mem = plan["memory"]
    assert (mem["data_parallel_size"], mem["expert_data_parallel_size"]) == (64, 8)
    assert mem["grad_bytes"] == 4 * plan["params_per_rank"]  # fp32 grad buffer
    # distributed optimizer: fp32 master + 2 Adam moments, dense over DP 64, experts over 8
    expert = plan["params_per_rank"] - plan["dense_params"]
    assert mem["optimizer_bytes"] == int(12 * (plan["dense_params"] / 64 + expert / 8))
    assert mem["total_bytes"] < 80 * 2**30  # fits an 80 GB GPU
    d = mem["dispatch"]
    assert round(d["copies_per_token"], 2) == 5.34  # the recipe's grove_alltoall: once per rank
    assert d["collectives_per_layer"] == 6  # full recompute reruns the forward all-to-alls
    assert d["tokens_per_rank"] == 512 // 64 * 8192
    plain = dry_run("grovemoe_33b_a3b.yaml", "--world-size", "64",
                    "parallel.use_distributed_optimizer=false", "parallel.recompute_granularity=none",
                    "moe.token_dispatcher_type=alltoall")
    assert plain["memory"]["optimizer_bytes"] == 12 * plan["params_per_rank"]
    assert plain["memory"]["activation_bytes"] > 4 * mem["activation_bytes"]
    # k + groups hit (adjugates as virtual experts of Megatron's all-to-all)
    assert round(plain["memory"]["dispatch"]["copies_per_token"], 2) == 15.78
    assert plain["memory"]["dispatch"]["collectives_per_layer"] == 4


def test_dry_run_checks_the_layout_against_the_world_size():
    proc = run_script("launch/pretrain_grove.py", "--config",
                      str(ROOT / "configs" / "grovemoe_33b_a3b.yaml"), "--dry-run",
                      "--world-size", "12")
    assert proc.returncode == 2
    assert "parallel.expert_model_parallel_size=8: must divide the data-parallel size 12" in proc.stderr


def test_dry_run_projects_the_all_to_all_at_scale():
    """The 33B recipe at EP 16 (2 nodes of 8 GPUs): a row per dispatch strategy on its own
    route, from the recipe's micro-batches (512 / DP 64), 8192 tokens each and
    full recompute (3 passes); bad link settings are refused with one line."""
    plan = dry_run("grovemoe_33b_a3b.yaml", "--world-size", "64",
                   "parallel.expert_model_parallel_size=16")
    proj = plan["dispatch_projection"]
    assert (proj["nodes_per_ep_group"], proj["tokens_per_microbatch"], proj["microbatches"],
            proj["passes"], proj["moe_layers"]) == (2, 8192, 8, 3, 48)
    rows = {(r["strategy"], r["route"]): r for r in proj["rows"]}
    assert set(rows) == {("alltoall, plain MoE", "flat"), ("alltoall, virtual adjugates", "flat"),
                         ("grove_alltoall", "flat"), ("grove_hierarchical", "hierarchical")}
    grove, virtual = rows["grove_alltoall", "flat"], rows["alltoall, virtual adjugates", "flat"]
    assert round(grove["copies_per_token"], 2) == 6.60
    assert round(grove["rdma_copies_per_token"], 2) == 3.30  # half the ranks are remote
    assert grove["layer_ms"] < virtual["layer_ms"] / 2
    proc = run_script("launch/pretrain_grove.py", "--config",
                      str(ROOT / "configs" / "grovemoe_33b_a3b.yaml"), "--dry-run",
                      "--gpus-per-node", "6")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith("must be a multiple of 6")


def test_235b_recipe_fits_on_32_nodes_with_two_pipeline_stages():
    """configs/grovemoe_235b_a22b.yaml on 256 ranks: the Qwen3-235B-A22B shape plus 64
    adjugates of FFN 256 per layer, two stages of 47 layers, TP=2 attention with whole experts
    (ETP=1) over EP=32, under 80 GB per rank on every stage."""
    plan = dry_run("grovemoe_235b_a22b.yaml", "--world-size", "256")
    assert plan["params_per_expert"] == 3 * 4096 * 1536
    assert plan["params_per_adjugate"] == 3 * 4096 * 256
    assert plan["routed_expert_params"] == 94 * 128 * 3 * 4096 * 1536
    assert 22e9 < plan["activated_params_min"] < plan["activated_params_max"] < 25e9
    mem = plan["memory"]
    assert [s["num_layers"] for s in mem["stages"]] == [47, 47]
    assert [s["micro_batches_in_flight"] for s in mem["stages"]] == [2, 1]
    assert (mem["data_parallel_size"], mem["expert_data_parallel_size"]) == (64, 4)
    # whole experts: each rank holds 1/32 of a stage's experts and adjugates
    stage_experts = (plan["routed_expert_params"] + plan["adjugate_params"]) // 2
    assert plan["stage_params"][0][1] == stage_experts // 32
    assert all(s["total_bytes"] < 80 * 2**30 for s in mem["stages"])
