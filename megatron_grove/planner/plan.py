"""Dry-run planner: parameter counts, activated parameters per token and per-rank parameter
memory for a config, from the real model built on the meta device (nothing is allocated).

The model is built once at EP = TP = PP = 1 in a single-process world; the configured layout
is then applied by arithmetic: routed experts and adjugates are split over EP x ETP ranks
(whole groups per EP rank; ETP = ``parallel.expert_tensor_parallel_size``, by default TP),
everything else over TP (embeddings, attention, dense FFNs, norms and the router are counted
as TP-sharded or replicated exactly as Megatron builds them at TP = 1, so per-rank figures for
TP > 1 are an upper bound for the replicated parts). Under pipeline parallelism every stage
holds its layers (``L / (PP x VPP)`` per model chunk, chunk ``c`` of stage ``s`` being virtual
stage ``c PP + s``, Megatron's interleaving), the first stage the embedding, the last the
final norm and output layer; per-rank figures are those of the largest stage.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

import torch

from megatron_grove.config import GroveConfig
from megatron_grove.megatron_config import TORCH_DTYPES, to_transformer_config
from megatron_grove.model import build_gpt_model

__all__ = ["ParamPlan", "MemoryPlan", "plan_parameters", "plan_memory", "activation_bytes_per_layer",
           "format_plan", "stage_layers", "micro_batches_in_flight"]


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
    params_per_rank: int  # the largest pipeline stage's
    param_bytes_per_rank: int
    layout: dict
    stage_params: list  # per pipeline stage: [dense params per rank, expert params per rank]

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


def stage_layers(cfg: GroveConfig) -> list[list[int]]:
    """The decoder layers (0-based) of each pipeline stage: ``num_layers_in_first/last_
    pipeline_stage`` on the first / last stage (when set), an even share of the rest on each
    other; each stage's layers in ``VPP`` equal chunks, chunk ``c`` of stage ``s`` being virtual
    stage ``c PP + s`` (Megatron's interleaved placement). The config's validation has checked
    that the layers divide so."""
    p, layers = cfg.parallel, cfg.model.num_layers
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    counts = [None] * pp
    if pp > 1:
        counts[0], counts[-1] = first, last
    fixed = sum(c for c in counts if c is not None)
    even = counts.count(None)
    counts = [c if c is not None else (layers - fixed) // even for c in counts]
    chunks = [[] for _ in range(pp)]
    start = 0
    for chunk in range(vpp):
        for stage in range(pp):
            size = counts[stage] // vpp
            chunks[stage] += range(start, start + size)
            start += size
    return chunks


def _layer_of(name: str) -> int | None:
    """0-based decoder layer of a parameter name, None outside the decoder layers."""
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def plan_parameters(cfg: GroveConfig) -> ParamPlan:
    """Needs Megatron's parallel state initialised for one process (EP = TP = PP = 1): the
    whole model is built."""
    one = dataclasses.replace(cfg, parallel=dataclasses.replace(
        cfg.parallel, expert_model_parallel_size=1, tensor_model_parallel_size=1,
        sequence_parallel=False, pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None, num_layers_in_first_pipeline_stage=None,
        num_layers_in_last_pipeline_stage=None, expert_tensor_parallel_size=None,
        context_parallel_size=1))
    tconfig = to_transformer_config(one, torch.float32, use_cpu_initialization=True)
    tconfig.perform_initialization = False
    with torch.device("meta"):
        model = build_gpt_model(tconfig, _vocab_size(cfg), cfg.model.seq_length,
                                cfg.model.rotary_base, cfg.model.tie_embeddings)
    stages = stage_layers(cfg)
    stage_of = {layer: s for s, layers in enumerate(stages) for layer in layers}
    counts: Counter[str] = Counter()
    per_stage = [Counter() for _ in stages]  # "dense" / "expert" (routed + adjugates)
    for name, param in model.named_parameters():
        kind = _kind(name)
        counts[kind] += param.numel()
        layer = _layer_of(name)
        stage = (stage_of[layer] if layer is not None
                 else 0 if name.startswith("embedding.") else len(stages) - 1)
        per_stage[stage]["dense" if kind == "dense" else "expert"] += param.numel()
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
    etp = p.expert_tensor_parallel
    # Megatron splits experts over EP x expert-TP (expert-TP defaults to TP)
    stage_params = [[c["dense"] // tp, c["expert"] // (ep * etp)] for c in per_stage]
    per_rank = max(dense + expert for dense, expert in stage_params)
    return ParamPlan(
        total_params=sum(counts.values()), dense_params=counts["dense"],
        routed_expert_params=counts["expert"], adjugate_params=counts["adjugate"],
        moe_layers=moe_layers, params_per_expert=per_expert, params_per_adjugate=per_adjugate,
        activated_params_min=base + moe_layers * hit_min * per_adjugate,
        activated_params_max=base + moe_layers * hit_max * per_adjugate,
        groups_hit_min=hit_min, groups_hit_max=hit_max, params_per_rank=per_rank,
        param_bytes_per_rank=per_rank * TORCH_DTYPES[cfg.runtime.dtype].itemsize,
        layout={"tensor_model_parallel_size": tp, "expert_model_parallel_size": ep,
                "expert_tensor_parallel_size": etp,
                "pipeline_model_parallel_size": p.pipeline_model_parallel_size,
                "virtual_pipeline_model_parallel_size": p.virtual_pipeline_model_parallel_size,
                "context_parallel_size": p.context_parallel_size, "dtype": cfg.runtime.dtype},
        stage_params=stage_params)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank for one training step (see :func:`plan_memory` for what is counted); the
    top-level figures are those of the pipeline stage with the largest total."""

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
    stages: list  # per pipeline stage: layers, micro-batches in flight and the bytes above

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def activation_bytes_per_layer(cfg: GroveConfig, groups_hit: float) -> dict[str, float]:
    """Bytes one decoder layer saves for backward, per micro-batch and rank, by part.

    With s = seq, b = micro-batch, h = hidden, a = heads, hq = a x head dim, hkv = KV heads x
    head dim, t = TP, c = CP (each CP rank holds s / c of the sequence), T = s b / (t c) tokens
    per rank under sequence parallelism (s b / c otherwise), E experts, k = top-k, f / fa =
    expert / adjugate FFN size, g = expected groups hit, d = bytes per activation element:

    * attention: d [3 T h (RMSNorm input and normalised input, QKV input) + s b (2 hq + 3 hkv)
      / (t c) (q, k, v and the QK-norm inputs) + s b hq / (t c) (output projection input)]
    * core attention (Megatron's unfused ``DotProductAttention``, the local layer spec): the
      softmax probabilities d b (a / t) (s / c) s (selective recompute drops this term);
    * MoE: d 4 T h (RMSNorm input and normalised input, router/dispatch input, combine) +
      4 T E (fp32 router logits) and per copy a token makes (k routed, g adjugate):
      d (h + 5 f) routed, d (h + 5 fa) adjugate (the expert input, the 2f-wide fc1 output,
      SwiGLU's silu and product and the down-projection input).
    """
    m, e, p = cfg.model, cfg.moe, cfg.parallel
    d = TORCH_DTYPES[cfg.runtime.dtype].itemsize
    t, s, h = p.tensor_model_parallel_size, m.seq_length, m.hidden_size
    c = p.context_parallel_size
    b = cfg.train.micro_batch_size
    hq = m.num_attention_heads * m.head_dim
    hkv = m.kv_heads * m.head_dim
    sb = s * b / c
    tokens = sb / t if p.sequence_parallel else sb
    attention = d * (3 * tokens * h + sb * (2 * hq + 3 * hkv) / t + sb * hq / t)
    core = d * b * (m.num_attention_heads / t) * (s / c) * s
    moe = (d * 4 * tokens * h + 4 * tokens * e.num_experts
           + tokens * e.router_topk * d * (h + 5 * e.ffn_hidden_size)
           + tokens * groups_hit * d * (h + 5 * e.adjugate_ffn_hidden_size))
    return {"attention": attention, "core_attention": core, "moe": moe}


def _activation_bytes(cfg: GroveConfig, parts: dict[str, float], layers: list[int],
                      in_flight: int, output: bool) -> float:
    """Saved activations of ``layers`` (0-based decoder layers) for ``in_flight`` micro-batches,
    recompute-aware, plus (``output``: the last stage) the output layer's input and its fp32
    logits for each (see :func:`plan_memory`)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    d = TORCH_DTYPES[cfg.runtime.dtype].itemsize
    tp, L = p.tensor_model_parallel_size, len(layers)
    sb = m.seq_length * t.micro_batch_size / p.context_parallel_size
    tokens = sb / (tp if p.sequence_parallel else 1)
    layer = parts["attention"] + parts["core_attention"] + parts["moe"]
    if p.recompute_granularity == "full":
        n = min(p.recompute_num_layers, L)
        # kept per micro-batch in flight: every unit's input (uniform) or the first n layers'
        # inputs and the other layers whole (block); one unit recomputed at a time
        if p.recompute_method == "uniform":
            total = in_flight * math.ceil(L / n) * d * tokens * m.hidden_size + n * layer
        else:
            total = in_flight * (n * d * tokens * m.hidden_size + (L - n) * layer) + layer
    else:
        if p.recompute_granularity == "selective":
            layer -= parts["core_attention"]
        dense_ffn = d * tokens * 2 * m.hidden_size + d * sb * 3 * m.ffn_hidden_size / tp
        k = sum(1 for i in layers if i < cfg.moe.first_k_dense_layers)
        total = in_flight * ((L - k) * layer + k * (layer - parts["moe"] + dense_ffn))
    if output:
        total += in_flight * (d * tokens * m.hidden_size + 4 * sb * _vocab_size(cfg) / tp)
    return total


def micro_batches_in_flight(cfg: GroveConfig, stage: int, num_micro_batches: int) -> int:
    """Micro-batches whose activations stage ``stage`` holds at once in Megatron's schedules:
    1F1B ``min(PP - stage, M)``; interleaved (VPP = v) ``(PP - stage - 1) 2 + (v - 1) PP + 1``
    model-chunk micro-batches of ``L / (PP v)`` layers each, i.e. that divided by v in stage
    micro-batches (returned rounded up); 1 without pipeline parallelism."""
    p = cfg.parallel
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size or 1
    if pp == 1:
        return 1
    if vpp == 1:
        return min(pp - stage, num_micro_batches)
    chunks = min((pp - stage - 1) * 2 + (vpp - 1) * pp + 1, num_micro_batches * vpp)
    return math.ceil(chunks / vpp)


def plan_memory(cfg: GroveConfig, plan: ParamPlan, world_size: int) -> MemoryPlan:
    """Per-rank memory of the configured layout on ``world_size`` ranks, per pipeline stage.

    * parameters: the stage's share (``plan.stage_params``) x bytes of ``runtime.dtype``;
    * gradients: Megatron DDP's buffer, fp32 (``grad_reduce_in_fp32``): 4 bytes per parameter;
    * optimizer (Adam): exp_avg + exp_avg_sq in fp32 (8 bytes) plus an fp32 master copy for
      bf16 parameters (4 bytes); with ``parallel.use_distributed_optimizer`` the dense part is
      sharded over the DP ranks (``world / (TP x CP x PP)``) and the expert part over the
      expert-DP ranks (``world / (ETP x EP x PP)``);
    * activations: the stage's layers' saved tensors (:func:`activation_bytes_per_layer`,
      expected groups hit under uniform routing) for each micro-batch in flight
      (:func:`micro_batches_in_flight`), plus on the last stage the output layer's input and
      fp32 logits (s b V / t x 4 bytes, kept by the cross entropy). Recompute ``selective``
      drops the core-attention term; ``full`` keeps each recompute unit's input (T h d per
      unit and micro-batch) plus one unit's activations while it is recomputed.
    Not counted: framework workspaces, communication buffers (pipeline P2P: one [s/c, b, h]
    tensor per direction), fragmentation.
    """
    from megatron_grove.planner.dispatch_volume import dispatch_volume, expected_blocks_hit

    m, e, p, t = cfg.model, cfg.moe, cfg.parallel, cfg.train
    tp, ep = p.tensor_model_parallel_size, p.expert_model_parallel_size
    etp = p.expert_tensor_parallel
    pp, cp = p.pipeline_model_parallel_size, p.context_parallel_size
    dp = world_size // (tp * cp * pp)
    edp = world_size // (ep * etp * pp)
    per_param_state = 8 + (4 if cfg.runtime.dtype == "bf16" else 0)
    g = (expected_blocks_hit(e.num_experts, e.router_topk, e.num_expert_groups)
         if e.num_expert_groups else 0.0)
    parts = activation_bytes_per_layer(cfg, g)
    num_micro = t.global_batch_size // (t.micro_batch_size * dp)
    stages = []
    for stage, layers in enumerate(stage_layers(cfg)):
        dense, expert = plan.stage_params[stage]
        params = (dense + expert) * TORCH_DTYPES[cfg.runtime.dtype].itemsize
        if p.use_distributed_optimizer:
            optimizer = per_param_state * (dense / dp + expert / edp)
        else:
            optimizer = per_param_state * (dense + expert)
        in_flight = micro_batches_in_flight(cfg, stage, num_micro)
        activations = _activation_bytes(cfg, parts, layers, in_flight, output=stage == pp - 1)
        grads = 4 * (dense + expert)
        stages.append({"stage": stage, "layers": [layers[0], layers[-1]] if layers else [],
                       "num_layers": len(layers), "micro_batches_in_flight": in_flight,
                       "params": dense + expert, "param_bytes": params, "grad_bytes": grads,
                       "optimizer_bytes": int(optimizer), "activation_bytes": int(activations),
                       "total_bytes": int(params + grads + optimizer + activations)})
    top = max(stages, key=lambda st: st["total_bytes"])
    tokens_per_rank = int(t.global_batch_size // dp * m.seq_length / cp
                          / (tp if p.sequence_parallel else 1))
    volume = dispatch_volume(e.dispatcher, e.num_experts, e.router_topk, ep,
                             e.num_expert_groups, plan.moe_layers, tokens_per_rank,
                             m.hidden_size, TORCH_DTYPES[cfg.runtime.dtype].itemsize,
                             recompute_forward=p.recompute_granularity == "full")
    return MemoryPlan(world_size=world_size, data_parallel_size=dp, expert_data_parallel_size=edp,
                      param_bytes=top["param_bytes"], grad_bytes=top["grad_bytes"],
                      optimizer_bytes=top["optimizer_bytes"],
                      activation_bytes=top["activation_bytes"],
                      activation_bytes_per_layer=int(sum(parts.values())),
                      total_bytes=top["total_bytes"], dispatch=volume.as_dict(), stages=stages)


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
        ("parameters per rank", f"{_human(plan.params_per_rank)}  ({_layout_words(plan.layout)})"),
        (f"parameter memory per rank ({plan.layout['dtype']})",
         f"{plan.param_bytes_per_rank / 2**30:.2f} GiB"),
    ]
    if memory is not None:
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        v = memory.dispatch
        rows += [
            ("layout", f"world {memory.world_size} = DP {memory.data_parallel_size} x TP "
                       f"{plan.layout['tensor_model_parallel_size']} x CP "
                       f"{plan.layout['context_parallel_size']} x PP "
                       f"{plan.layout['pipeline_model_parallel_size']} (experts: expert-DP "
                       f"{memory.expert_data_parallel_size} x EP {v['expert_parallel_size']} x "
                       f"ETP {plan.layout['expert_tensor_parallel_size']})"),
            ("gradient memory per rank (fp32 buffer)", gib(memory.grad_bytes)),
            ("optimizer state per rank", gib(memory.optimizer_bytes)),
            ("activations per rank (micro-batches in flight)", gib(memory.activation_bytes)),
            ("  one layer without recompute", gib(memory.activation_bytes_per_layer)),
            ("total per rank (estimate)", gib(memory.total_bytes)),
            (f"all-to-all copies per token ({v['dispatcher']})", f"{v['copies_per_token']:.2f}"),
            ("all-to-all bytes per rank per step", f"{v['bytes_per_step'] / 2**30:.2f} GiB "
                                                  f"({v['off_rank_bytes_per_step'] / 2**30:.2f} GiB off-rank)"),
        ]
    if memory is not None and len(memory.stages) > 1:
        gib = lambda n: f"{n / 2**30:.2f}"  # noqa: E731
        rows.append(("per pipeline stage (GiB)", "params / grads / optimizer / activations "
                                                "(micro-batches in flight) = total"))
        for st in memory.stages:
            rows.append((f"  stage {st['stage']}: {st['num_layers']} layers",
                         f"{gib(st['param_bytes'])} / {gib(st['grad_bytes'])} / "
                         f"{gib(st['optimizer_bytes'])} / {gib(st['activation_bytes'])} "
                         f"({st['micro_batches_in_flight']}) = {gib(st['total_bytes'])}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _layout_words(layout: dict) -> str:
    words = [f"TP={layout['tensor_model_parallel_size']}",
             f"EP={layout['expert_model_parallel_size']}",
             f"ETP={layout['expert_tensor_parallel_size']}",
             f"PP={layout['pipeline_model_parallel_size']}"]
    if layout["virtual_pipeline_model_parallel_size"]:
        words.append(f"VPP={layout['virtual_pipeline_model_parallel_size']}")
    if layout["context_parallel_size"] > 1:
        words.append(f"CP={layout['context_parallel_size']}")
    return ", ".join(words) + (", the largest stage" if layout["pipeline_model_parallel_size"] > 1
                               else "")
