"""GroveMoELayer (CPU, fp32, gloo): against the plain-torch reference, across expert-parallel
sizes and both stock dispatchers, against Megatron's MoELayer when the adjugates vanish, with an
EP rank that receives no tokens; the layer spec wiring; the Grove config validation."""

from __future__ import annotations

import dataclasses
import functools
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from _dist import run_distributed
from grove_reference import GroveWeights, grove_forward
from megatron_grove.adjugate_experts import VirtualExpertLayout
from megatron_grove.config import ConfigError, load_config, validate_layout
from megatron_grove.grove_layer import GroveMoELayer
from megatron_grove.megatron_config import GroveTransformerConfig, to_transformer_config
from megatron_grove.model import build_gpt_model
from megatron_grove.router import GroveTopKRouter

HIDDEN, FFN, ADJUGATE_FFN, NUM_TOKENS = 16, 8, 6, 32
DISPATCHERS = ("alltoall", "allgather")
GRAD_KEYS = ("router", "expert_fc1", "expert_fc2", "adjugate_fc1", "adjugate_fc2")


@dataclass(frozen=True)
class Case:
    experts: int
    topk: int
    groups: int
    score_function: str

    @property
    def id(self) -> str:
        return f"E{self.experts}k{self.topk}G{self.groups}-{self.score_function}"


CASES = (Case(8, 2, 4, "softmax"), Case(8, 2, 4, "sigmoid"), Case(8, 3, 2, "softmax"),
         Case(16, 4, 8, "sigmoid"), Case(4, 1, 4, "sigmoid"))


@dataclass
class Run:
    """One forward/backward of one layer over ``NUM_TOKENS`` tokens split across the EP ranks."""

    case: Case
    dispatcher: str
    weights: GroveWeights
    x: torch.Tensor  # [NUM_TOKENS, H]
    cotangent: torch.Tensor  # [NUM_TOKENS, H]: the loss is sum(y * cotangent)
    adjugate_scale: float
    expert_bias: Optional[torch.Tensor] = None  # [E]; None: moe_bias_update_rule='none'
    stock: bool = False  # Megatron's MoELayer + TopKRouter instead of GroveMoELayer
    kernels_backend: str = "torch"  # kernels' implementation (group-aware dispatch path)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------


@functools.cache
def case_data(case: Case) -> tuple[GroveWeights, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, expert bias ``[E]``, tokens ``[N, H]`` and cotangent ``[N, H]`` of a case. Every
    other token points along one group's router direction, so it selects experts of that group
    (all of its k when k <= E/G)."""
    seed = CASES.index(case)
    weights = GroveWeights.random(case.experts, case.groups, HIDDEN, FFN, ADJUGATE_FFN,
                                  seed=seed, group_affinity=2.0)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    directions = GroveWeights.group_directions(case.groups, HIDDEN)
    focused = torch.arange(0, NUM_TOKENS, 2)
    x[focused] = 0.3 * x[focused] + 2.0 * directions[focused % case.groups]
    bias = 0.05 * torch.randn(case.experts, generator=gen)
    return weights, bias, x, torch.randn(NUM_TOKENS, HIDDEN, generator=gen)


def grove_run(case: Case, dispatcher: str, **overrides: Any) -> Run:
    weights, bias, x, cotangent = case_data(case)
    run = Run(case, dispatcher, weights, x, cotangent,
              adjugate_scale=case.groups / case.experts, expert_bias=bias)
    return dataclasses.replace(run, **overrides)


@functools.cache
def reference(case: Case) -> tuple[dict[str, torch.Tensor], int, int]:
    """The reference's output, input gradient and weight gradients for ``grove_run(case)``, and
    its (token, expert) and (token, group) evaluation counts."""
    weights, bias, x, cotangent = case_data(case)
    weights = GroveWeights(*(t.clone() for t in dataclasses.astuple(weights))).requires_grad_()
    x = x.clone().requires_grad_()
    out = grove_forward(x, weights, case.topk, case.groups, case.groups / case.experts,
                        case.score_function, expert_bias=bias)
    (out.y * cotangent).sum().backward()
    result = {"y": out.y.detach(), "x_grad": x.grad, **weights.grads()}
    return result, out.routed_evaluations, out.adjugate_evaluations


# --------------------------------------------------------------------------------------
# the distributed side
# --------------------------------------------------------------------------------------


def layer_config(run: Run, ep: int) -> GroveTransformerConfig:
    case = run.case
    return GroveTransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=1, ffn_hidden_size=FFN,
        gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        use_cpu_initialization=True, expert_model_parallel_size=ep,
        num_moe_experts=case.experts, moe_ffn_hidden_size=FFN, moe_router_topk=case.topk,
        moe_router_score_function=case.score_function, moe_router_pre_softmax=False,
        moe_token_dispatcher_type=(
            "alltoall" if run.dispatcher == "grove_alltoall" else run.dispatcher),
        moe_group_aware_dispatch=run.dispatcher == "grove_alltoall",
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0, moe_num_expert_groups=case.groups,
        moe_adjugate_ffn_hidden_size=ADJUGATE_FFN, moe_adjugate_scale=run.adjugate_scale,
        moe_bias_update_rule="none" if run.expert_bias is None else "paper",
        grove_kernels_backend=run.kernels_backend)


def build_layer(run: Run, ep: int) -> MoELayer:
    submodules = get_moe_module_spec(use_te=False, num_experts=run.case.experts).keywords[
        "submodules"]
    config = layer_config(run, ep)
    if run.stock:
        return MoELayer(config, submodules=dataclasses.replace(submodules, router=TopKRouter))
    return GroveMoELayer(config, submodules=dataclasses.replace(submodules, router=GroveTopKRouter))


def _expert_params(layer: MoELayer, ep_rank: int) -> dict[str, dict[int, torch.nn.Parameter]]:
    """``{'expert_fc1': {global expert: weight}, ..., 'adjugate_fc2': {group: weight}}``."""
    params: dict[str, dict[int, torch.nn.Parameter]] = {}
    modules = [("expert", layer.experts)]
    if isinstance(layer, GroveMoELayer):
        modules.append(("adjugate", layer.adjugate_experts))
    for kind, experts in modules:
        local = experts.local_experts
        for fc in ("fc1", "fc2"):
            params[f"{kind}_{fc}"] = {ep_rank * len(local) + i: getattr(mlp, f"linear_{fc}").weight
                                      for i, mlp in enumerate(local)}
    return params


def load_weights(layer: MoELayer, run: Run, ep_rank: int) -> None:
    with torch.no_grad():
        layer.router.weight.copy_(run.weights.router)
        if run.expert_bias is not None:
            layer.router.expert_bias.copy_(run.expert_bias)
        for key, params in _expert_params(layer, ep_rank).items():
            for index, param in params.items():
                param.copy_(getattr(run.weights, key)[index])


def forward_backward(rank: int, runs: list[Run]) -> bytes:
    """Worker: each run's local output, input gradient, weight gradients and counters, pickled
    (tensors by value: torch's queue sharing needs the worker alive until they are read)."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    results = []
    for run in runs:
        layer = build_layer(run, ep)
        load_weights(layer, run, rank)
        rows = slice(rank * NUM_TOKENS // ep, (rank + 1) * NUM_TOKENS // ep)
        x = run.x[rows].clone().unsqueeze(1).requires_grad_()  # [T, B=1, H]
        y, _ = layer(x)
        (y.squeeze(1) * run.cotangent[rows]).sum().backward()
        grads = {key: {i: p.grad.clone() for i, p in params.items()}
                 for key, params in _expert_params(layer, rank).items()}
        results.append({"y": y.detach().squeeze(1), "x_grad": x.grad.squeeze(1),
                        "router": layer.router.weight.grad.clone(), **grads,
                        "counters": dict(getattr(layer, "grove_counters", {}))})
    return pickle.dumps(results)


def run_layers(runs: list[Run], ep: int) -> list[dict[str, Any]]:
    """Run ``runs`` on ``ep`` ranks (EP = world size); per run, the global tensors: outputs
    and input gradients concatenated over ranks, router gradients summed (as data-parallel
    reduction would), expert gradients stacked by global index, counters summed."""
    per_rank = [pickle.loads(r) for r in run_distributed(forward_backward, world_size=ep,
                                                          expert_parallel=ep, args=(runs,))]
    merged = []
    for results in zip(*per_rank):
        out = {"y": torch.cat([r["y"] for r in results]),
               "x_grad": torch.cat([r["x_grad"] for r in results]),
               "router": sum(r["router"] for r in results),
               "counters": {k: sum(r["counters"][k] for r in results)
                            for k in results[0]["counters"]},
               "rank_counters": [r["counters"] for r in results]}
        for key in GRAD_KEYS[1:]:
            by_index = {i: g for r in results for i, g in r.get(key, {}).items()}
            if by_index:
                out[key] = torch.stack([by_index[i] for i in sorted(by_index)])
        merged.append(out)
    return merged


def assert_matches(actual: dict, expected: dict, keys: tuple[str, ...], rel: float) -> None:
    """max |actual - expected| <= rel * max(1, max |expected|) for every key."""
    for key in keys:
        scale = max(1.0, expected[key].abs().max().item())
        err = (actual[key] - expected[key]).abs().max().item()
        assert err <= rel * scale, f"{key}: max error {err:.3g} (scale {scale:.3g})"


ALL_KEYS = ("y", "x_grad") + GRAD_KEYS


# --------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------


@functools.cache
def ep1_results(dispatcher: str) -> tuple[dict[str, Any], ...]:
    return tuple(run_layers([grove_run(case, dispatcher) for case in CASES], ep=1))


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
def test_matches_reference_at_ep1(dispatcher):
    for case, result in zip(CASES, ep1_results(dispatcher)):
        expected, routed, adjugate = reference(case)
        assert_matches(result, expected, ALL_KEYS, rel=1e-5)
        # a copy per virtual expert (alltoall); every token to the one rank (allgather)
        copies = routed + adjugate if dispatcher == "alltoall" else NUM_TOKENS
        assert result["counters"] == {"dispatched_rows": copies, "routed_rows": routed,
                                      "adjugate_rows": adjugate, "forwards": 1}, case.id


def test_tokens_within_one_group_evaluate_its_adjugate_once():
    """The data force tokens whose k selected experts share a group: the adjugate evaluations
    (token rows through adjugates) are the (token, group) pairs, fewer than (token, expert)."""
    for case in CASES:
        if case.topk > 1:
            _, routed, adjugate = reference(case)
            assert adjugate < routed, case.id
    case = CASES[0]  # E=8, k=2, G=4: a focused token selects both experts of its group
    weights, bias, x, _ = case_data(case)
    groups = torch.topk(torch.sigmoid(x @ weights.router.T) + bias, case.topk).indices // 2
    assert (groups[:, 0] == groups[:, 1]).sum() >= NUM_TOKENS // 4


@pytest.mark.parametrize("dispatcher", DISPATCHERS)
@pytest.mark.parametrize("ep", (2, 4))
def test_expert_parallel_matches_ep1(ep, dispatcher):
    cases = [case for case in CASES if case.groups % ep == 0]
    results = run_layers([grove_run(case, dispatcher) for case in cases], ep=ep)
    baseline = dict(zip(CASES, ep1_results(dispatcher)))
    for case, result in zip(cases, results):
        assert_matches(result, baseline[case], ALL_KEYS, rel=1e-6)
        assert_matches(result, reference(case)[0], ALL_KEYS, rel=1e-5)
        assert result["counters"]["routed_rows"] == baseline[case]["counters"]["routed_rows"]
        assert result["counters"]["adjugate_rows"] == baseline[case]["counters"]["adjugate_rows"]


@pytest.mark.parametrize("ep", (1, 2))
def test_vanishing_adjugates_equal_megatron_moe_layer(ep):
    """lam = 0, or adjugate down-projections at zero: Megatron's MoELayer (stock TopKRouter)
    with the same weights gives the same output and gradients."""
    keys = ("y", "x_grad", "router", "expert_fc1", "expert_fc2")
    runs = []
    for dispatcher in DISPATCHERS:
        for case in (c for c in CASES if c.groups % ep == 0):
            weights = case_data(case)[0]
            zero_down = dataclasses.replace(weights,
                                            adjugate_fc2=torch.zeros_like(weights.adjugate_fc2))
            runs += [grove_run(case, dispatcher, expert_bias=None, stock=True),
                     grove_run(case, dispatcher, expert_bias=None, adjugate_scale=0.0),
                     grove_run(case, dispatcher, expert_bias=None, weights=zero_down)]
    results = run_layers(runs, ep=ep)
    for i in range(0, len(runs), 3):
        stock, lam_zero, zero_down = results[i:i + 3]
        assert_matches(lam_zero, stock, keys, rel=1e-6)
        assert_matches(zero_down, stock, keys, rel=1e-6)
        assert zero_down["adjugate_fc1"].abs().max() == 0


@pytest.mark.parametrize("score_function", ("softmax", "sigmoid"))
def test_ep_rank_without_tokens(score_function):
    """All tokens of both ranks select rank 0's experts: rank 1 computes nothing and the
    output and gradients still match the reference."""
    case = Case(8, 2, 4, score_function)
    weights = GroveWeights.random(8, 4, HIDDEN, FFN, ADJUGATE_FFN, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    x[:, 0] = 4.0
    weights.router[:4, 0], weights.router[4:, 0] = 0.0, -12.0  # experts 4..7 live on rank 1
    cotangent = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    runs = [Run(case, dispatcher, weights, x, cotangent, adjugate_scale=0.5)
            for dispatcher in DISPATCHERS]
    w = GroveWeights(*(t.clone() for t in dataclasses.astuple(weights))).requires_grad_()
    x_ref = x.clone().requires_grad_()
    out = grove_forward(x_ref, w, 2, 4, 0.5, score_function)
    (out.y * cotangent).sum().backward()
    expected = {"y": out.y.detach(), "x_grad": x_ref.grad, **w.grads()}
    assert out.tokens_per_expert[4:].sum() == 0
    for result in run_layers(runs, ep=2):
        computed = {k: result["rank_counters"][1][k] for k in ("routed_rows", "adjugate_rows")}
        assert computed == {"routed_rows": 0, "adjugate_rows": 0}
        assert_matches(result, expected, ALL_KEYS, rel=1e-5)
        assert result["expert_fc1"][4:].abs().max() == 0
        assert result["adjugate_fc1"][2:].abs().max() == 0


def test_virtual_expert_layout():
    layout = VirtualExpertLayout(num_experts=8, num_groups=4, ep_size=2, adjugate_scale=0.5)
    assert (layout.local_experts, layout.local_adjugates) == (4, 2)
    assert layout.local_virtual_indices(1) == [6, 7, 8, 9, 10, 11]
    probs = torch.zeros(1, 8)
    probs[0, 2], probs[0, 3], probs[0, 4] = 0.5, 0.25, 0.25  # groups 1, 1, 2
    virtual_probs, virtual_map = layout.extend(probs, probs > 0)
    #                        rank 0: experts 0-3, adjugates 0-1 | rank 1: experts 4-7, adj. 2-3
    assert virtual_probs[0].tolist() == [0, 0, .5, .25, 0, .375, .25, 0, 0, 0, .125, 0]
    assert virtual_map[0].tolist() == [bool(v) for v in virtual_probs[0].tolist()]
    with pytest.raises(ValueError, match="must divide num_moe_experts"):
        VirtualExpertLayout(8, 3, 1, 0.1)
    with pytest.raises(ValueError, match="must divide moe_num_expert_groups"):
        VirtualExpertLayout(8, 2, 4, 0.1)


def _model_wiring(rank: int) -> bytes:
    """A 2-layer GPT (dense, then Grove MoE: E=4, G=2) at EP=2: forward/backward, the layer
    types, state_dict keys and the sharded (checkpoint) view of bias and adjugates."""
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32",
                             "model.num_attention_heads=2", "model.ffn_hidden_size=64",
                             "moe.first_k_dense_layers=1", "moe.num_experts=4",
                             "moe.num_expert_groups=2", "moe.ffn_hidden_size=16",
                             "moe.adjugate_ffn_hidden_size=8", "moe.adjugate_scale=0.5",
                             "parallel.expert_model_parallel_size=2"])
    model = build_gpt_model(to_transformer_config(cfg), vocab_size=64, seq_length=8)
    mlps = [layer.mlp for layer in model.decoder.layers]
    tokens = torch.randint(0, 64, (2, 8))
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    loss = model(tokens, torch.arange(8).expand(2, 8), mask, labels=tokens)
    loss.sum().backward()
    sharded = {t.key: (tuple(t.global_shape), t.global_offset)
               for t in model.sharded_state_dict().values()
               if getattr(t, "key", "").endswith(("expert_bias", "adjugate_experts.experts."
                                                                 "linear_fc2.weight"))}
    adjugate_fc1 = mlps[1].adjugate_experts.local_experts[0].linear_fc1.weight
    return pickle.dumps({"mlp_types": [type(m).__name__ for m in mlps],
                         "router": type(mlps[1].router).__name__,
                         "keys": [k for k in model.state_dict() if "layers.1.mlp" in k],
                         "sharded": sharded, "counters": mlps[1].grove_counters,
                         "adjugate_trained": bool(adjugate_fc1.grad.abs().sum() > 0)})


def test_layer_spec_builds_grove_layers():
    for rank, result in enumerate(map(pickle.loads, run_distributed(
            _model_wiring, world_size=2, expert_parallel=2))):
        assert result["mlp_types"] == ["MLP", "GroveMoELayer"]
        assert result["router"] == "GroveTopKRouter"
        prefix = "decoder.layers.1.mlp."
        assert prefix + "router.expert_bias" in result["keys"]
        assert prefix + "adjugate_experts.local_experts.0.linear_fc2.weight" in result["keys"]
        assert result["sharded"] == {  # one adjugate per rank: group `rank` of 2
            prefix + "router.expert_bias": ((4,), (0,)),
            prefix + "adjugate_experts.experts.linear_fc2.weight": ((2, 32, 8), (rank, 0, 0))}
        assert result["counters"]["forwards"] == 1
        assert result["adjugate_trained"]


# --------------------------------------------------------------------------------------
# config validation (config.py)
# --------------------------------------------------------------------------------------


def test_config_rejects_groups_not_dividing_experts():
    with pytest.raises(ConfigError, match=r"moe.num_expert_groups=3: must divide "
                                          r"moe.num_experts=8 \(allowed: 1, 2, 4, 8\)"):
        load_config(None, ["moe.num_experts=8", "moe.num_expert_groups=3"])


def test_config_rejects_adjugate_scale_above_g_over_e():
    overrides = ["moe.num_experts=8", "moe.num_expert_groups=2", "moe.adjugate_scale=0.3"]
    with pytest.raises(ConfigError, match=r"moe.adjugate_scale=0.3: the paper requires "
                                          r"lam <= G/E = 0.25"):
        load_config(None, overrides)
    assert load_config(None, overrides + ["moe.allow_large_adjugate_scale=true"])
    assert load_config(None, overrides[:2] + ["moe.adjugate_scale=0.25"])


def test_layout_rejects_ep_not_dividing_groups():
    cfg = load_config(None, ["moe.num_experts=8", "moe.num_expert_groups=2",
                             "parallel.expert_model_parallel_size=4"])
    with pytest.raises(ConfigError, match=r"parallel.expert_model_parallel_size=4: must divide "
                                          r"moe.num_expert_groups=2"):
        validate_layout(cfg, world_size=4)
    cfg.moe.num_expert_groups = 4
    assert validate_layout(cfg, world_size=4) == 4
