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
from megatron_grove.megatron_config import TORCH_DTYPES, to_transformer_config
from megatron_grove.model import build_gpt_model

__all__ = ["ParamPlan", "MemoryPlan", "plan_parameters", "plan_memory", "activation_bytes_per_layer",
           "format_plan"]


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


def _vocab_size(cfg: GroveConfig) -> int:
    """``model.vocab_size``, else the size of the run's tokenizer (as training does)."""
    from megatron_grove.data.tokenizer import load_tokenizer

    return cfg.model.vocab_size or load_tokenizer(cfg.data.tokenizer).vocab_size


def plan_parameters(cfg: GroveConfig) -> ParamPlan:
    """Needs Megatron's parallel state initialised for one process (EP = TP = PP = 1): the
    whole model is built."""
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, expert_model_parallel_size=1, tensor_model_parallel_size=1,
        sequence_parallel=False, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, num_layers_in_first_pipeline_stage=None,
        num_layers_in_last_pipeline_stage=None))
    tconfig = to_transformer_config(one, torch.float32, use_cpu_initialization=True)
    tconfig.perform_initialization = False
    with torch.device("meta"):
        model = build_gpt_model(tconfig, _vocab_size(cfg), cfg.model.seq_length,
                                cfg.model.rotary_base, cfg.model.tie_embeddings)
    counts: Counter[str] = Counter()
    for name, param in model.named_parameters():
        counts[_kind(name)] += param.numel()
    e = cfg.moe
    moe_layers = cfg.model.num_layers - e.first_k_dense_layers
    per_expert = counts["expert"] // (moe_layers * e.num_experts)
    per_adjugate = counts["adjugate"] // (moe_layers * e.num_expert_groups) if e.num_expert_groups else 0
    if e.num_expert_groups:
        hit_min = math.ceil(e.router_topk / e.experts_per_group)
        hit_max = min(e.router_topk, e.num_expert_groups)
    else:
        hit_min = hit_max = 0
    base = counts["dense"] + moe_layers * e.router_topk * per_expert
    p = cfg.parallel
    ep, tp = p.expert_model_parallel_size, p.tensor_model_parallel_size
    # Megatron splits experts over EP x expert-TP, and expert-TP defaults to TP
    per_rank = counts["dense"] // tp + (counts["expert"] + counts["adjugate"]) // (ep * tp)
    return ParamPlan(
        total_params=sum(counts.values()), dense_params=counts["dense"],
        routed_expert_params=counts["expert"], adjugate_params=counts["adjugate"],
        moe_layers=moe_layers, params_per_expert=per_expert, params_per_adjugate=per_adjugate,
        activated_params_min=base + moe_layers * hit_min * per_adjugate,
        activated_params_max=base + moe_layers * hit_max * per_adjugate,
        groups_hit_min=hit_min, groups_hit_max=hit_max, params_per_rank=per_rank,
        param_bytes_per_rank=per_rank * TORCH_DTYPES[cfg.runtime.dtype].itemsize,
        layout={"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep,
                "dtype": cfg.runtime.dtype})


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank for one training step (see :func:`plan_memory` for what is counted)."""

    world_size: int
    data_parallel_size: int
    expert_data_parallel_size: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    activation_bytes_per_layer: int  # one decoder layer, as saved without recompute
    total_bytes: int
    dispatch: dict  # megatron_grove.planner.dispatch_volume.DispatchVolume.as_dict()

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def activation_bytes_per_layer(cfg: GroveConfig, groups_hit: float) -> dict[str, float]:
    """Bytes one decoder layer saves for backward, per micro-batch and rank, by part.

    With s = seq, b = micro-batch, h = hidden, a = heads, hq = a x head dim, hkv = KV heads x
    head dim, t = TP (T = s b / t tokens per rank under sequence parallelism, s b otherwise),
    E experts, k = top-k, f / fa = expert / adjugate FFN size, g = expected groups hit, d = bytes
    per activation element:

    * attention: d [3 T h (RMSNorm input and normalised input, QKV input) + s b (2 hq + 3 hkv)
      / t (q, k, v and the QK-norm inputs) + s b hq / t (output projection input)]
    * core attention (Megatron's unfused ``DotProductAttention``, the local layer spec): the
      softmax probabilities d b (a / t) s^2 (selective recompute drops this term);
    * MoE: d 4 T h (RMSNorm input and normalised input, router/dispatch input, combine) +
      4 T E (fp32 router logits) and per copy a token makes (k routed, g adjugate):
      d (h + 5 f) routed, d (h + 5 fa) adjugate (the expert input, the 2f-wide fc1 output,
      SwiGLU's silu and product and the down-projection input).
    """
    m, e, p = cfg.model, cfg.moe, cfg.parallel
    d = TORCH_DTYPES[cfg.runtime.dtype].itemsize
    t, s, h = p.tensor_model_parallel_size, m.seq_length, m.hidden_size
    b = cfg.train.micro_batch_size
    hq = m.num_attention_heads * m.head_dim
    hkv = m.kv_heads * m.head_dim
    tokens = s * b / t if p.sequence_parallel else s * b
    attention = d * (3 * tokens * h + s * b * (2 * hq + 3 * hkv) / t + s * b * hq / t)
    core = d * b * (m.num_attention_heads / t) * s * s
    moe = (d * 4 * tokens * h + 4 * tokens * e.num_experts
           + tokens * e.router_topk * d * (h + 5 * e.ffn_hidden_size)
           + tokens * groups_hit * d * (h + 5 * e.adjugate_ffn_hidden_size))
    return {"attention": attention, "core_attention": core, "moe": moe}


def _activation_bytes(cfg: GroveConfig, parts: dict[str, float]) -> float:
    """All layers' saved activations for one micro-batch, recompute-aware, plus the output
    layer's input and its fp32 logits (see :func:`plan_memory`)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    d = TORCH_DTYPES[cfg.runtime.dtype].itemsize
    tp, L = p.tensor_model_parallel_size, m.num_layers
    sb = m.seq_length * t.micro_batch_size
    tokens = sb / (tp if p.sequence_parallel else 1)
    layer = parts["attention"] + parts["core_attention"] + parts["moe"]
    if p.recompute_granularity == "full":
        n = p.recompute_num_layers
        if p.recompute_method == "uniform":  # every unit of n layers keeps its input
            layers = math.ceil(L / n) * d * tokens * m.hidden_size + n * layer
        else:  # block: the first n layers keep their input, the others everything
            layers = n * d * tokens * m.hidden_size + layer + (L - n) * layer
    else:
        if p.recompute_granularity == "selective":
            layer -= parts["core_attention"]
        dense_ffn = d * tokens * 2 * m.hidden_size + d * sb * 3 * m.ffn_hidden_size / tp
        k = cfg.moe.first_k_dense_layers
        layers = (L - k) * layer + k * (layer - parts["moe"] + dense_ffn)
    vocab = _vocab_size(cfg) / tp
    return layers + d * tokens * m.hidden_size + 4 * sb * vocab


def plan_memory(cfg: GroveConfig, plan: ParamPlan, world_size: int) -> MemoryPlan:
    """Per-rank memory of the configured layout on ``world_size`` ranks.

    * parameters: ``plan.params_per_rank`` x bytes of ``runtime.dtype``;
    * gradients: Megatron DDP's buffer, fp32 (``grad_reduce_in_fp32``): 4 bytes per parameter;
    * optimizer (Adam): exp_avg + exp_avg_sq in fp32 (8 bytes) plus an fp32 master copy for
      bf16 parameters (4 bytes); with ``parallel.use_distributed_optimizer`` the dense part is
      sharded over the DP ranks and the expert part over the expert-DP ranks;
    * activations: one micro-batch in flight (PP = 1): the layers' saved tensors
      (:func:`activation_bytes_per_layer`, expected groups hit under uniform routing) plus the
      output layer's input and fp32 logits (s b V / t x 4 bytes, kept by the cross entropy).
      Recompute ``selective`` drops the core-attention term; ``full`` keeps each recompute
      unit's input (T h d per unit) plus one layer's activations while it is recomputed.
    Not counted: framework workspaces, communication buffers, fragmentation.
    """
    from megatron_grove.planner.dispatch_volume import dispatch_volume, expected_blocks_hit

    m, e, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    tp, ep = p.tensor_model_parallel_size, p.expert_model_parallel_size
    pp = p.pipeline_model_parallel_size
    dp = world_size // (tp * pp)
    edp = world_size // (ep * tp * pp)
    d = TORCH_DTYPES[cfg.runtime.dtype].itemsize
    dense_rank = plan.dense_params // tp
    expert_rank = plan.params_per_rank - dense_rank
    per_param_state = 8 + (4 if cfg.runtime.dtype == "bf16" else 0)
    if p.use_distributed_optimizer:
        optimizer = per_param_state * (dense_rank / dp + expert_rank / edp)
    else:
        optimizer = per_param_state * plan.params_per_rank
    g = (expected_blocks_hit(e.num_experts, e.router_topk, e.num_expert_groups)
         if e.num_expert_groups else 0.0)
    parts = activation_bytes_per_layer(cfg, g)
    activations = int(_activation_bytes(cfg, parts))
    tokens_per_rank = int(t.global_batch_size // dp * m.seq_length
                          / (tp if p.sequence_parallel else 1))
    volume = dispatch_volume(e.dispatcher, e.num_experts, e.router_topk, ep,
                             e.num_expert_groups, plan.moe_layers, tokens_per_rank,
                             m.hidden_size, d, recompute_forward=p.recompute_granularity == "full")
    params, grads = plan.param_bytes_per_rank, 4 * plan.params_per_rank
    return MemoryPlan(world_size=world_size, data_parallel_size=dp, expert_data_parallel_size=edp,
                      param_bytes=params, grad_bytes=grads, optimizer_bytes=int(optimizer),
                      activation_bytes=activations, activation_bytes_per_layer=int(sum(parts.values())),
                      total_bytes=int(params + grads + optimizer + activations),
                      dispatch=volume.as_dict())


def _human(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def format_plan(plan: ParamPlan, memory: MemoryPlan | None = None) -> str:
    """A readable table of the plan (and of the memory plan, when given)."""
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
    if memory is not None:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        v = memory.dispatch
        rows += [
            ("layout", f"world {memory.world_size} = DP {memory.data_parallel_size} x TP "
                       f"{plan.layout['tensor_model_parallel_size']} (expert-DP "
                       f"{memory.expert_data_parallel_size} x EP {v['expert_parallel_size']})"),
            ("gradient memory per rank (fp32 buffer)", gib(memory.grad_bytes)),
            ("optimizer state per rank", gib(memory.optimizer_bytes)),
            ("activations per rank (1 micro-batch)", gib(memory.activation_bytes)),
            ("  one layer without recompute", gib(memory.activation_bytes_per_layer)),
            ("total per rank (estimate)", gib(memory.total_bytes)),
            (f"all-to-all copies per token ({v['dispatcher']})", f"{v['copies_per_token']:.2f}"),
            ("all-to-all bytes per rank per step", f"{v['bytes_per_step'] / 2**30:.2f} GiB "
                                                  f"({v['off_rank_bytes_per_step'] / 2**30:.2f} GiB off-rank)"),
        ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
