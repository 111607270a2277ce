"""Dry-run planner: parameter counts, activated parameters per token and per-rank parameter
memory for a config, from the real model built on the meta device (nothing is allocated).

The model is built once at EP = TP = 1 in a single-process world; the configured layout is
then applied by arithmetic: routed experts and adjugates are split over EP ranks (whole
groups per rank), everything else over TP (embeddings, attention, dense FFNs, norms and the
router are counted as TP-sharded or replicated exactly as Megatron builds them at TP = 1, so
per-rank figures for TP > 1 are an upper bound for the replicated parts).
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch

from megatron_grove.config import GroveConfig
from megatron_grove.megatron_config import to_transformer_config
from megatron_grove.model import build_gpt_model

__all__ = ["ParamPlan", "plan_parameters", "format_plan"]

BYTES = {"fp32": 4, "bf16": 2}


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    total_params: int
    dense_params: int  # everything but routed experts and adjugates
    routed_expert_params: int  # all layers, all experts
    adjugate_params: int  # all layers, all groups
    moe_layers: int
    params_per_expert: int  # one routed expert of one layer
    params_per_adjugate: int  # one adjugate of one layer
    activated_params_min: int  # a token whose k experts fill as few groups as possible
    activated_params_max: int  # ... as many groups as possible
    groups_hit_min: int
    groups_hit_max: int
    params_per_rank: int
    param_bytes_per_rank: int
    layout: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _kind(name: str) -> str:
    if ".adjugate_experts." in name:
        return "adjugate"
    if ".experts." in name:
        return "expert"
    return "dense"


def plan_parameters(cfg: GroveConfig) -> ParamPlan:
    """Needs Megatron's parallel state initialised for one process (EP = TP = 1)."""
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, expert_model_parallel_size=1, tensor_model_parallel_size=1,
        sequence_parallel=False))
    tconfig = to_transformer_config(one, torch.float32, use_cpu_initialization=True)
    tconfig.perform_initialization = False
    with torch.device("meta"):
        model = build_gpt_model(tconfig, cfg.model.vocab_size or 4096, cfg.model.seq_length,
                                cfg.model.rotary_base, cfg.model.tie_embeddings)
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        counts[_kind(name)] += param.numel()
    e = cfg.moe
    moe_layers = cfg.model.num_layers - e.first_k_dense_layers
    per_expert = counts["expert"] // (moe_layers * e.num_experts)
    per_adjugate = counts["adjugate"] // (moe_layers * e.num_expert_groups) if e.num_expert_groups else 0
    if e.num_expert_groups:
        per_group = e.num_experts // e.num_expert_groups
        hit_min, hit_max = math.ceil(e.router_topk / per_group), min(e.router_topk, e.num_expert_groups)
    else:
        hit_min = hit_max = 0
    base = counts["dense"] + moe_layers * e.router_topk * per_expert
    p = cfg.parallel
    ep, tp = p.expert_model_parallel_size, p.tensor_model_parallel_size
    per_rank = counts["dense"] // tp + (counts["expert"] + counts["adjugate"]) // ep
    return ParamPlan(
        total_params=sum(counts.values()), dense_params=counts["dense"],
        routed_expert_params=counts["expert"], adjugate_params=counts["adjugate"],
        moe_layers=moe_layers, params_per_expert=per_expert, params_per_adjugate=per_adjugate,
        activated_params_min=base + moe_layers * hit_min * per_adjugate,
        activated_params_max=base + moe_layers * hit_max * per_adjugate,
        groups_hit_min=hit_min, groups_hit_max=hit_max, params_per_rank=per_rank,
        param_bytes_per_rank=per_rank * BYTES[cfg.runtime.dtype],
        layout={"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep,
                "dtype": cfg.runtime.dtype})


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_plan(plan: ParamPlan) -> str:
    """A readable table of the plan."""
    rows = [
        ("total parameters", _human(plan.total_params)),
        ("  dense (attention, embeddings, norms, routers, dense FFNs)", _human(plan.dense_params)),
        ("  routed experts", _human(plan.routed_expert_params)),
        ("  adjugate experts", _human(plan.adjugate_params)),
        ("activated per token (min)", f"{_human(plan.activated_params_min)}  "
                                      f"({plan.groups_hit_min} groups hit per layer)"),
        ("activated per token (max)", f"{_human(plan.activated_params_max)}  "
                                      f"({plan.groups_hit_max} groups hit per layer)"),
        ("parameters per rank", f"{_human(plan.params_per_rank)}  (TP={plan.layout['tensor_model_parallel_size']}, "
                                f"EP={plan.layout['expert_model_parallel_size']})"),
        (f"parameter memory per rank ({plan.layout['dtype']})",
         f"{plan.param_bytes_per_rank / 2**30:.2f} GiB"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
