"""YAML -> typed config -> Megatron TransformerConfig, overrides, and the error messages."""

from pathlib import Path

import pytest
import torch

from megatron_grove.config import ConfigError, GroveConfig, load_config, validate_layout
from megatron_grove.megatron_config import to_transformer_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_tiny_config_loads_and_overrides_apply():
    cfg = load_config(CONFIGS / "tiny_cpu.yaml",
                      ["train.iters=7", "train.lr_warmup_iters=2", "train.global_batch_size=4", "train.seed=9",
                       "parallel.expert_model_parallel_size=1",
                       "parallel.tensor_model_parallel_size=1", "checkpoint.save=/tmp/x",
                       "checkpoint.load=/tmp/y", "checkpoint.save_interval=3",
                       "logging.dir=/tmp/z", "train.lr=1e-3"])
    assert isinstance(cfg, GroveConfig)
    assert (cfg.train.iters, cfg.train.global_batch_size, cfg.train.seed) == (7, 4, 9)
    assert cfg.parallel.expert_model_parallel_size == 1
    assert (cfg.checkpoint.save, cfg.checkpoint.load, cfg.checkpoint.save_interval) == \
        ("/tmp/x", "/tmp/y", 3)
    assert cfg.logging.dir == "/tmp/z" and cfg.train.lr == 1e-3


def test_every_shipped_config_loads():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert files
    for path in files:
        load_config(path)


def test_transformer_config_carries_our_fields():
    cfg = load_config(None, ["moe.num_expert_groups=4", "moe.first_k_dense_layers=1",
                             "moe.router_score_function=sigmoid", "model.num_layers=3"])
    t = to_transformer_config(cfg, torch.float32)
    assert t.num_moe_experts == 8 and t.moe_router_topk == 2
    assert t.moe_num_expert_groups == 4 and t.moe_router_score_function == "sigmoid"
    assert t.moe_layer_freq == [0, 1, 1]
    assert t.moe_router_enable_expert_bias is False  # balancing is ours, not finalize_model_grads'


def test_dispatcher_defaults_to_group_aware_when_there_are_groups():
    """``moe.token_dispatcher_type: auto`` (the default) is grove_hierarchical for a Grove MoE
    (grove_alltoall's code on one node) and Megatron's alltoall for a plain one; an explicit
    choice stays; every shipped Grove config runs the group-aware dispatcher."""
    grove = load_config(None, ["moe.num_expert_groups=4"])
    plain = load_config(None, [])
    assert grove.moe.token_dispatcher_type == plain.moe.token_dispatcher_type == "auto"
    assert (grove.moe.dispatcher, plain.moe.dispatcher) == ("grove_hierarchical", "alltoall")
    t = to_transformer_config(grove)
    assert (t.moe_grove_dispatcher, t.moe_token_dispatcher_type) == ("grove_hierarchical",
                                                                     "alltoall")
    for name in ("alltoall", "allgather", "grove_alltoall"):
        chosen = load_config(None, ["moe.num_expert_groups=4", f"moe.token_dispatcher_type={name}"])
        assert chosen.moe.dispatcher == to_transformer_config(chosen).moe_grove_dispatcher == name
    grove_configs = [path for path in sorted(CONFIGS.glob("*.yaml"))
                     if load_config(path).moe.num_expert_groups]
    assert len(grove_configs) >= 4
    for path in grove_configs:
        assert load_config(path).moe.dispatcher == "grove_hierarchical", path.name


@pytest.mark.parametrize("overrides, needle", [
    (["train.iterz=3"], "unknown key train.iterz; allowed in train:"),
    (["nosuch.key=1"], "unknown key nosuch; allowed in config:"),
    (["train.iters=abc"], "train.iters='abc': expected int"),
    (["train.lr=fast"], "train.lr='fast': expected float"),
    (["moe.router_score_function=relu"], "expected 'softmax' | 'sigmoid'"),
    (["train.iters=0"], "train.iters=0: must be >= 1"),
    (["moe.router_topk=9"], "moe.router_topk=9: must be <= moe.num_experts=8"),
    (["train.global_batch_size=7"], "must be a multiple of train.micro_batch_size=2"),
    (["train.lr_warmup_iters=500"], "train.lr_warmup_iters=500: must be < train.iters"),
    (["moe.num_expert_groups=3"], "moe.num_expert_groups=3: must divide moe.num_experts=8 "
                                  "(allowed: 1, 2, 4, 8)"),
    (["moe.num_expert_groups=4", "moe.adjugate_scale=0.9"], "lam <= G/E = 0.5"),
    (["train"], "expected dotted key=value"),
    (["moe.router_topk=1"], "moe.router_topk=1 with moe.router_score_function=softmax"),
    (["train.iters.x=1"], "train.iters={'x': 1}: expected int"),
    (["model.num_query_groups=0"], "model.num_query_groups=0: must be >= 1 or null"),
    (["model.kv_channels=0"], "model.kv_channels=0: must be >= 1 or null"),
    (["train.lr=.nan"], "train.lr=nan: must be a finite number >= 0"),
    (["train.lr=nan"], "train.lr=nan: must be a finite number >= 0"),
    (["train.lr=-1e-3"], "train.lr=-0.001: must be a finite number >= 0"),
    (["train.lr=1e-5"], "train.min_lr=0.0003: must be <= train.lr=1e-05"),
    (["train.adam_beta2=1.0"], "train.adam_beta2=1.0: allowed 0 <= value < 1"),
    (["train.adam_eps=0"], "train.adam_eps=0.0: must be a finite number > 0"),
    (["train.max_skipped_steps=-1"], "train.max_skipped_steps=-1: must be >= 0"),
    (["checkpoint.lock_stale_s=0"], "checkpoint.lock_stale_s=0: must be >= 1"),
    (["logging.straggler_factor=1.0"], "logging.straggler_interval=50 / straggler_factor=1.0"),
    (["runtime.hang_timeout_s=300"], "runtime.hang_timeout_s=300: allowed 1..runtime."
                                     "dist_timeout_s-1=299"),
])
def test_bad_config_names_key_and_allowed(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_large_adjugate_scale_can_be_allowed_explicitly():
    cfg = load_config(None, ["moe.num_expert_groups=4", "moe.adjugate_scale=0.9",
                             "moe.allow_large_adjugate_scale=true"])
    assert cfg.moe.adjugate_scale == 0.9


@pytest.mark.parametrize("overrides, world, needle", [
    (["parallel.expert_model_parallel_size=3"], 2, "expert_model_parallel_size=3: must divide "
                                                    "the data-parallel size 2"),
    (["parallel.expert_model_parallel_size=3", "moe.num_experts=9",
      "train.global_batch_size=6"], 3, None),
    (["parallel.expert_model_parallel_size=4", "moe.num_experts=6"], 4,
     "must divide moe.num_experts=6"),
    (["parallel.tensor_model_parallel_size=3", "parallel.sequence_parallel=true"], 2,
     "must divide the world size 2"),
    (["moe.num_expert_groups=2", "moe.adjugate_scale=0.1",
      "parallel.expert_model_parallel_size=4", "train.global_batch_size=16"], 4,
     "must divide moe.num_expert_groups=2 so that whole groups"),
    (["train.global_batch_size=2", "train.micro_batch_size=2"], 2,
     "train.global_batch_size=2: must be a multiple of micro_batch_size 2 x data-parallel size 2"),
])
def test_layout_validation(overrides, world, needle):
    cfg = load_config(None, overrides)
    if needle is None:
        assert validate_layout(cfg, world) == world
        return
    with pytest.raises(ConfigError) as err:
        validate_layout(cfg, world)
    assert needle in str(err.value)


def test_missing_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_base_inheritance_lays_keys_over_the_base(tmp_path):
    """A variant names its base and only the keys that differ; sections merge key by key, the
    variant's keys and the command line win; the shipped G=16 ablation is the G=64 recipe with
    16 groups."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("model:\n  num_layers: 3\n  hidden_size: 64\n"
                                        "moe:\n  num_expert_groups: 4\ntrain:\n  iters: 9\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../base.yaml\nmodel:\n  num_layers: 5\n")
    (tmp_path / "leaf.yaml").write_text("base: sub/mid.yaml\ntrain:\n  iters: 11\n")
    cfg = load_config(tmp_path / "leaf.yaml", ["model.hidden_size=32"])
    assert (cfg.model.num_layers, cfg.model.hidden_size, cfg.moe.num_expert_groups,
            cfg.train.iters) == (5, 32, 4, 11)
    a3b, g16 = load_config(CONFIGS / "grovemoe_33b_a3b.yaml"), load_config(
        CONFIGS / "grovemoe_33b_g16.yaml")
    assert g16.moe.num_expert_groups == 16 and g16.moe.experts_per_group == 8
    g16.moe.num_expert_groups = 64
    g16.checkpoint, g16.logging = a3b.checkpoint, a3b.logging
    assert g16 == a3b


def test_base_errors_name_the_file(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="base: chain loops back to itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing.yaml \(base of .*c.yaml\): no such file"):
        load_config(tmp_path / "c.yaml")


def test_derived_values_live_on_the_typed_config():
    cfg = load_config(None, ["model.hidden_size=96", "model.num_attention_heads=4",
                             "moe.num_experts=8", "moe.num_expert_groups=2"])
    assert (cfg.model.head_dim, cfg.model.kv_heads, cfg.moe.experts_per_group) == (24, 4, 4)
    cfg = load_config(None, ["model.kv_channels=16", "model.num_query_groups=2",
                             "moe.num_expert_groups=0"])
    assert (cfg.model.head_dim, cfg.model.kv_heads, cfg.moe.experts_per_group) == (16, 2, 0)


@pytest.mark.parametrize("overrides, needle", [
    (["data.path=[[0.7,a],[0,b]]"], "data.path[1]=[0, 'b']: expected [weight, prefix] with a "
                                    "weight > 0, e.g. data.path=[[0.7,data/web],[0.3,data/books]]"),
    (["data.path=[a,b]"], "data.path[0]='a': expected [weight, prefix]"),
    (["data.path=[]"], "data.path=[]: an empty blend"),
    (["data.valid_path=[[1,x,y]]"], "data.valid_path[0]=[1, 'x', 'y']: expected [weight, prefix]"),
    (["data.path=5"], "data.path=5: expected str or list or null"),
    (["data.split=98,2"], None),  # two shares: test 0, as in Megatron
    (["data.split=98;2;0"], "data.split='98;2;0': expected Megatron's split string"),
    (["data.split=0,100,0"], "data.split=0,100,0: the training share must be > 0"),
    (["data.split=-1,2,0"], "data.split='-1,2,0': expected Megatron's split string"),
    (["data.split=98,2,0", "data.valid_path=v"], "data.split=98,2,0: with data.valid_path"),
    (["train.eval_interval=0"], "train.eval_interval=0: must be >= 1"),
    (["train.eval_iters=-1"], "train.eval_iters=-1: must be >= 0 (0 = no validation)"),
    (["logging.peak_tflops=0"], "logging.peak_tflops=0.0: must be > 0 or null"),
])
def test_data_validation_and_throughput_keys(overrides, needle):
    if needle is None:
        load_config(None, overrides)
        return
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_blend_and_split_from_yaml_and_overrides(tmp_path):
    (tmp_path / "run.yaml").write_text("data:\n  path:\n    - [0.7, data/web]\n"
                                       "    - [0.3, data/books]\n  split: '90,10,0'\n")
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.path == [[0.7, "data/web"], [0.3, "data/books"]]
    assert cfg.data.resolved_split == "90,10,0"
    cfg = load_config(None, ["data.path=[[2,a],[1,b]]", "data.valid_path=v"])
    assert cfg.data.path == [[2, "a"], [1, "b"]] and cfg.data.resolved_split is None
    assert load_config(None).data.resolved_split == "98,2,0"  # Megatron-style default
    assert load_config(CONFIGS / "tiny_cpu.yaml").data.resolved_split == "95,5,0"
