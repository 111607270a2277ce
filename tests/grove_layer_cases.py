"""Grove-layer cases: the layer on gloo ranks (every dispatcher, forced routings) against the
plain-torch reference (:mod:`grove_reference`), outputs and gradients."""

from __future__ import annotations

import dataclasses
import functools
import pickle
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from config_builders import HIDDEN, transformer_config
from grove_reference import GroveWeights, grove_forward
from megatron_grove.megatron_config import GroveTransformerConfig
from processes import run_distributed

FFN, ADJUGATE_FFN, NUM_TOKENS = 8, 6, 32
DISPATCHERS = ("alltoall", "allgather")
GRAD_KEYS = ("router", "expert_fc1", "expert_fc2", "adjugate_fc1", "adjugate_fc2")
ALL_KEYS = ("y", "x_grad") + GRAD_KEYS


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
    dispatcher: str  # moe.token_dispatcher_type
    weights: GroveWeights
    x: torch.Tensor  # [NUM_TOKENS, H]
    cotangent: torch.Tensor  # [NUM_TOKENS, H]: the loss is sum(y * cotangent)
    adjugate_scale: float
    expert_bias: Optional[torch.Tensor] = None  # [E]; None: moe.bias_update_rule=none
    stock: bool = False  # Megatron's MoELayer + TopKRouter instead of GroveMoELayer
    kernels_backend: str = "torch"  # kernels' implementation (group-aware dispatch path)


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


def reference_of(run: Run) -> tuple[dict[str, torch.Tensor], Any]:
    """The reference's output, input gradient and weight gradients for ``run``, and its
    :class:`grove_reference.ReferenceOutput` (counts)."""
    weights = GroveWeights(*(t.clone() for t in dataclasses.astuple(run.weights))).requires_grad_()
    x = run.x.clone().requires_grad_()
    out = grove_forward(x, weights, run.case.topk, run.case.groups, run.adjugate_scale,
                        run.case.score_function, expert_bias=run.expert_bias)
    (out.y * run.cotangent).sum().backward()
    return {"y": out.y.detach(), "x_grad": x.grad, **weights.grads()}, out


@functools.cache
def reference(case: Case) -> tuple[dict[str, torch.Tensor], int, int]:
    """:func:`reference_of` ``grove_run(case)``, with its (token, expert) and (token, group)
    evaluation counts."""
    expected, out = reference_of(grove_run(case, "alltoall"))
    return expected, out.routed_evaluations, out.adjugate_evaluations


def layer_config(run: Run, ep: int, device: str = "cpu", tp: int = 1,
                 etp: Optional[int] = None) -> GroveTransformerConfig:
    """The run's one-layer config (local modules, no TransformerEngine), through the config
    path; ``tp`` > 1 with sequence parallelism, ``etp``: the experts' TP size (None: ``tp``)."""
    case = run.case
    return transformer_config(
        device, precision__transformer_engine=False, model__num_layers=1,
        model__hidden_size=HIDDEN, model__num_attention_heads=tp,
        model__ffn_hidden_size=FFN, moe__num_experts=case.experts, moe__ffn_hidden_size=FFN,
        moe__router_topk=case.topk, moe__router_score_function=case.score_function,
        moe__token_dispatcher_type=run.dispatcher, moe__num_expert_groups=case.groups,
        moe__adjugate_ffn_hidden_size=ADJUGATE_FFN, moe__adjugate_scale=run.adjugate_scale,
        moe__allow_large_adjugate_scale=True,
        moe__bias_update_rule="none" if run.expert_bias is None else "paper",
        parallel__expert_model_parallel_size=ep, kernels__backend=run.kernels_backend,
        parallel__tensor_model_parallel_size=tp, parallel__sequence_parallel=tp > 1,
        **({} if etp is None else {"parallel__expert_tensor_parallel_size": etp}))


def build_layer(run: Run, ep: int, device: str = "cpu", tp: int = 1, etp: Optional[int] = None):
    """The run's layer, built by :func:`megatron_grove.moe.build_moe_layer` (``stock``:
    Megatron's ``MoELayer`` + ``TopKRouter``, on Megatron's MoE spec)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_grove.moe import build_moe_layer

    config = layer_config(run, ep, device, tp, etp)
    if run.stock:
        submodules = get_moe_module_spec(use_te=False, num_experts=run.case.experts).keywords[
            "submodules"]
        return MoELayer(config, submodules=dataclasses.replace(submodules, router=TopKRouter))
    return build_moe_layer(config)


def _expert_params(layer, ep_rank: int) -> dict[str, dict[int, torch.nn.Parameter]]:
    """``{'expert_fc1': {global expert: weight}, ..., 'adjugate_fc2': {group: weight}}``."""
    params: dict[str, dict[int, torch.nn.Parameter]] = {}
    banks = [("expert", layer.experts)]
    if getattr(layer, "adjugate_experts", None) is not None:
        banks.append(("adjugate", layer.adjugate_experts))
    for kind, experts in banks:
        local = experts.local_experts
        for fc in ("fc1", "fc2"):
            params[f"{kind}_{fc}"] = {ep_rank * len(local) + i: getattr(mlp, f"linear_{fc}").weight
                                      for i, mlp in enumerate(local)}
    return params


def load_weights(layer, run: Run, ep_rank: int) -> None:
    """Copy the run's router, bias, expert and adjugate weights into ``layer`` (EP rank
    ``ep_rank``'s slice)."""
    with torch.no_grad():
        layer.router.weight.copy_(run.weights.router)
        if run.expert_bias is not None:
            layer.router.expert_bias.copy_(run.expert_bias)
        for key, params in _expert_params(layer, ep_rank).items():
            for index, param in params.items():
                param.copy_(getattr(run.weights, key)[index])


def _forward_backward(rank: int, runs: list[Run]) -> bytes:
    """Worker: each run's local output, input gradient, weight gradients and counters."""
    from megatron.core import parallel_state

    ep = parallel_state.get_expert_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    world = dist.get_world_size()
    results = []
    for run in runs:
        layer = build_layer(run, ep, tp=tp, etp=etp)
        load_weights(layer, run, ep_rank)
        # every rank its own tokens (TP ranks: their sequence-parallel slice)
        rows = slice(rank * NUM_TOKENS // world, (rank + 1) * NUM_TOKENS // world)
        x = run.x[rows].clone().unsqueeze(1).requires_grad_()  # [T, B=1, H]
        y, _ = layer(x)
        (y.squeeze(1) * run.cotangent[rows]).sum().backward()
        grads = {key: {i: p.grad.clone() for i, p in params.items()}
                 for key, params in _expert_params(layer, ep_rank).items()}
        results.append({"y": y.detach().squeeze(1), "x_grad": x.grad.squeeze(1),
                        "router": layer.router.weight.grad.clone(), **grads,
                        "counters": dict(getattr(layer, "grove_counters", {}))})
    return pickle.dumps(results)


def run_layers(runs: list[Run], ep: int, world_size: Optional[int] = None, tp: int = 1,
               etp: Optional[int] = None, ranks_per_node: Optional[int] = None
               ) -> list[dict[str, Any]]:
    """Run ``runs`` on ``world_size`` ranks (default EP; ``tp``: attention's TP size, with
    sequence parallelism; ``etp``: the experts' TP size, None = ``tp``; nodes of
    ``ranks_per_node`` ranks, None: one node), every rank on its own
    share of the tokens; per run, the global tensors: outputs and input gradients concatenated
    over ranks, router gradients summed (as data-parallel reduction would), expert gradients
    by global index, summed over the ranks holding a replica of the expert, and stacked;
    counters summed."""
    per_rank = [pickle.loads(r) for r in run_distributed(
        _forward_backward, world_size=world_size or ep, tensor_parallel=tp, expert_parallel=ep,
        expert_tensor_parallel=etp, ranks_per_node=ranks_per_node, args=(runs,))]
    merged = []
    for results in zip(*per_rank):
        out = {"y": torch.cat([r["y"] for r in results]),
               "x_grad": torch.cat([r["x_grad"] for r in results]),
               "router": sum(r["router"] for r in results),
               "counters": {k: sum(r["counters"][k] for r in results)
                            for k in results[0]["counters"]},
               "rank_counters": [r["counters"] for r in results]}
        for key in GRAD_KEYS[1:]:
            by_index: dict[int, torch.Tensor] = {}
            for r in results:
                for i, g in r.get(key, {}).items():
                    by_index[i] = by_index[i] + g if i in by_index else g
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


# Forced routings (E=8, k=2, G=4: groups of 2 experts; at EP=2 a rank holds 2 groups).
FORCED = Case(8, 2, 4, "softmax")
FORCED_NAMES = ("rank_idle", "one_group", "uneven")


def forced_run(name: str, dispatcher: str) -> Run:
    """``rank_idle``: every token selects experts 0..3 (experts 4..7, i.e. EP rank 1 of 2 and
    ranks 2, 3 of 4, receive nothing); ``one_group``: each token selects both experts of one
    group; ``uneven``: 3/4 of the tokens select group 0, the rest route freely;
    ``alternate_groups``: each token selects both experts of group 0 or of group 2 (experts 2, 3,
    6, 7 receive nothing: EP ranks 1 and 3 of 4, while ranks 0 and 2 do)."""
    weights = GroveWeights.random(8, 4, HIDDEN, FFN, ADJUGATE_FFN, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    if name == "rank_idle":
        x[:, 0] = 4.0
        weights.router[:4, 0], weights.router[4:, 0] = 0.0, -12.0
    else:
        index = torch.arange(NUM_TOKENS)
        groups = {"one_group": index % 4, "alternate_groups": 2 * (index % 2),
                  "uneven": torch.where(index % 4 < 3, 0, -1)}[name]
        x[:, :4] = 0.0
        for token, group in enumerate(groups.tolist()):
            if group >= 0:
                x[token, group] = 4.0
        weights.router[:, :4] = -3.0
        weights.router[torch.arange(8), torch.arange(8) // 2] = 3.0
    cotangent = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    return Run(FORCED, dispatcher, weights, x, cotangent, adjugate_scale=0.5)
