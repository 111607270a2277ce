"""Typed run configuration: YAML file + dotted ``key=value`` overrides -> :class:`GroveConfig`.

Configuration flows one way: YAML -> :func:`load_config` (type-checked dataclasses) ->
:func:`megatron_grove.megatron_config.to_transformer_config` (Megatron's
``TransformerConfig`` plus our Grove fields). Nothing else reads the YAML or globals.

Every problem is reported as a :class:`ConfigError` whose message names the key, the value
and what is allowed; the command-line entry points print it as one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

__all__ = [
    "ConfigError", "ModelConfig", "MoEConfig", "ParallelConfig", "TrainConfig", "DataConfig",
    "CheckpointConfig", "LoggingConfig", "RuntimeConfig", "KernelsConfig", "PrecisionConfig",
    "GroveConfig",
    "load_config", "read_yaml_config", "apply_overrides", "config_to_dict", "config_from_dict",
    "validate_layout", "ROUTING_KEYS", "routing_differences",
]


class ConfigError(ValueError):
    """A configuration problem, with a message fit to print as the only line of output."""


@dataclass
class ModelConfig:
    """Transformer shape (Qwen3-style: RMSNorm, SwiGLU, RoPE, QK-norm, no biases)."""

    num_layers: int = 2
    hidden_size: int = 128
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA KV heads; None = num_attention_heads
    kv_channels: Optional[int] = None  # head dim; None = hidden_size / heads
    ffn_hidden_size: int = 512  # dense FFN size (dense layers only)
    seq_length: int = 128
    vocab_size: Optional[int] = None  # None = the tokenizer's vocabulary size
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    qk_layernorm: bool = True
    init_method_std: float = 0.02
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        """Per-head size: ``kv_channels``, else ``hidden_size / num_attention_heads``."""
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: ``num_query_groups``, else one per attention head."""
        return self.num_query_groups or self.num_attention_heads


@dataclass
class MoEConfig:
    """Routed experts, Grove groups/adjugates, router and balancing."""

    num_experts: int = 8  # 0 = a dense model (every layer a SwiGLU FFN of model.ffn_hidden_size)
    router_topk: int = 2
    ffn_hidden_size: int = 128  # per routed expert
    first_k_dense_layers: int = 0  # DeepSeek-style: the first k layers use a dense FFN
    num_expert_groups: int = 0  # G; 0 = plain MoE (no adjugate experts)
    adjugate_ffn_hidden_size: int = 32
    adjugate_scale: float = 0.05  # lam; must be <= G/E unless allow_large_adjugate_scale
    allow_large_adjugate_scale: bool = False
    router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    # false: the selected experts' weights are not renormalised (softmax over all E at the
    # selection, or the plain sigmoids), as Hugging Face's norm_topk_prob=false
    norm_topk_prob: bool = True
    # false: the expert bias is kept (checkpoints, exports) but selects nothing and is not
    # updated, e.g. a released GroveMoE checkpoint, whose code never reads its bias
    expert_bias_in_selection: bool = True
    # auto: grove_hierarchical with groups (once per destination node across nodes, then once
    # per destination rank inside the node, adjugates beside their group; on one node it is
    # grove_alltoall), Megatron's alltoall without; see `dispatcher`
    token_dispatcher_type: Literal["auto", "alltoall", "allgather", "grove_alltoall",
                                   "grove_hierarchical"] = "auto"
    bias_update_rule: Literal["paper", "megatron", "none"] = "paper"
    bias_update_rate: float = 1e-3
    aux_loss_coeff: float = 0.0
    # cmoe / cmoe_linear: carved models (tools/carve_cmoe.py --router paper / linear)
    router_type: Literal["grove", "cmoe", "cmoe_linear"] = "grove"
    shared_expert_ffn_hidden_size: Optional[int] = None  # Megatron's shared expert; None = none

    @property
    def experts_per_group(self) -> int:
        """n = E / G experts per group (0 without groups)."""
        return self.num_experts // self.num_expert_groups if self.num_expert_groups else 0

    @property
    def dispatcher(self) -> str:
        """The dispatch strategy that runs: ``token_dispatcher_type``, with ``auto`` resolved to
        ``grove_hierarchical`` when there are expert groups (the fewest copies per token: once
        per destination node across nodes and once per destination EP rank inside a node,
        instead of once per expert and group hit; on one node it runs ``grove_alltoall``'s code)
        and to ``alltoall`` otherwise (a plain MoE is Megatron's layer on Megatron's
        all-to-all)."""
        if self.token_dispatcher_type != "auto":
            return self.token_dispatcher_type
        return "grove_hierarchical" if self.num_expert_groups else "alltoall"


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1  # stages, 1F1B schedule (Megatron's)
    # model chunks per stage (Megatron's interleaved schedule); null = not interleaved
    virtual_pipeline_model_parallel_size: Optional[int] = None
    # layer counts that do not divide: the first / last stage's layers (null: an even share)
    num_layers_in_first_pipeline_stage: Optional[int] = None
    num_layers_in_last_pipeline_stage: Optional[int] = None
    # the experts' own TP size (Megatron's expert_tensor_parallel_size); None = the TP size.
    # E.g. TP=2 attention with ETP=1 whole experts: experts then spread over EP x ETP ranks
    expert_tensor_parallel_size: Optional[int] = None
    # sequence split over CP ranks in attention (Megatron's; needs TransformerEngine attention: GPU)
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    # ranks of one node (hierarchical dispatch: a token crosses nodes once per destination
    # node); null: torchrun's LOCAL_WORLD_SIZE. Set it to emulate nodes by groups of ranks
    ranks_per_node: Optional[int] = None
    use_distributed_optimizer: bool = False  # shard fp32 master weights + Adam moments over DP
    # activation recompute (Megatron's): none | selective (attention core) | full (whole layers)
    recompute_granularity: Literal["none", "selective", "full"] = "none"
    recompute_method: Literal["uniform", "block"] = "uniform"  # full only: how layers are chosen
    recompute_num_layers: int = 1  # full only: layers per recompute unit (uniform) / first N (block)

    @property
    def expert_tensor_parallel(self) -> int:
        """The experts' TP size in force: ``expert_tensor_parallel_size``, else
        ``tensor_model_parallel_size`` (Megatron's default)."""
        return self.expert_tensor_parallel_size or self.tensor_model_parallel_size


@dataclass
class TrainConfig:
    iters: int = 100
    global_batch_size: int = 8
    micro_batch_size: int = 2
    seed: int = 1234
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: int = 10
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    exit_at_iter: Optional[int] = None  # stop (and save, if checkpoint.save) after this step
    trainable: Literal["all", "router"] = "all"  # router: train only the routers' parameters
    # the loss of a step: false = the mean of the micro-batches' per-token means; true = the
    # mean over the loss tokens of the global batch (Megatron's calculate_per_token_loss; what
    # chat data needs, where micro-batches hold uneven numbers of assistant tokens)
    per_token_loss: bool = False
    # validation: every eval_interval steps and after the last step, on the same eval_iters
    # global batches of the validation data each time; eval_iters=0: no validation
    eval_interval: int = 1000
    eval_iters: int = 10
    # a step whose loss or gradient is non-finite on any rank is skipped (no update); this
    # many skipped steps in a row stop the run (exit code 3); 0 = stop at the first one
    max_skipped_steps: int = 10


@dataclass
class DataConfig:
    """Training and validation data (Megatron's ``blend``, ``split`` and ``blend_per_split``).

    A data source is a Megatron indexed-dataset prefix (``PREFIX.bin``/``PREFIX.idx``) or a
    weighted blend of several, ``[[weight, prefix], ...]`` (Megatron's ``BlendedDataset``).
    """

    path: Union[str, list, None] = None  # training data: prefix or blend; None = embedded corpus
    # Megatron's split string "train,valid,test" (shares of data.path's documents, in order);
    # None: "98,2,0", or all of data.path when data.valid_path is set
    split: Optional[str] = None
    valid_path: Union[str, list, None] = None  # separate validation data: a prefix or a blend
    tokenizer: Optional[str] = None  # tokenizer.json or a HF model dir; None = the shipped one

    @property
    def resolved_split(self) -> Optional[str]:
        """The split string in force: ``split``, else ``DEFAULT_SPLIT``; None when
        ``valid_path`` is set (``path`` is then trained on whole)."""
        if self.valid_path is not None:
            return None
        return self.split or DEFAULT_SPLIT


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None  # a checkpoint.save folder, or "auto": checkpoint.save if it has one
    save_interval: int = 0  # 0 = only at the end (when save is set)
    # Distributed-optimizer state on disk (Megatron's formats): "fully_reshardable" resumes at
    # any TP/EP/DP layout but gathers each DP group's state in host memory on save;
    # "dp_reshardable" saves every rank's shard in parallel and resumes only at the saved
    # TP/EP sizes. Ignored by the plain optimizer, whose checkpoints always reshard.
    optimizer_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"
    # When checkpoint.save already holds checkpoints, the run resumes from the newest one that
    # verifies, whatever checkpoint.load says (load only gives a new run's starting point).
    # overwrite=true starts from checkpoint.load (or from scratch) instead and deletes the
    # checkpoints in checkpoint.save newer than that starting step.
    overwrite: bool = False
    # one run per folder (checkpoint.save, logging.dir): a lock whose holder on another host
    # has not refreshed it for this long is taken over (on this host: when its pid is gone)
    lock_stale_s: int = 300
    # true: Megatron's asynchronous dist-checkpoint save; a forked process writes the tensors while
    # training goes on, and the checkpoint is published (manifest, rename, latest pointer) only
    # once every rank's write has finished; at most one write in flight (docs/fault_tolerance.md)
    async_save: bool = False


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    log_interval: int = 1
    tensorboard: bool = True
    progress_bar: bool = True
    # per-device peak TFLOP/s for MFU; None: the bf16 dense peak of a known GPU, none on CPU
    peak_tflops: Optional[float] = None
    # every N steps the ranks exchange their step times (one small all-gather); a rank whose
    # time exceeds the median by straggler_factor for straggler_intervals exchanges in a row
    # is logged (0: no exchange)
    straggler_interval: int = 50
    straggler_factor: float = 1.5
    straggler_intervals: int = 3


@dataclass
class RuntimeConfig:
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["fp32", "bf16"] = "fp32"
    dist_timeout_s: int = 300
    # no step finished for this long: every rank writes its stack to logging.dir and the job
    # stops, exit 1 (null: no watchdog); keep it below dist_timeout_s
    hang_timeout_s: Optional[int] = None


@dataclass
class KernelsConfig:
    backend: Literal["auto", "torch", "triton"] = "auto"  # auto: triton on GPU, torch on CPU


@dataclass
class PrecisionConfig:
    """TransformerEngine and FP8 (GPU only; see :mod:`megatron_grove.runtime.acceleration`)."""

    transformer_engine: Optional[bool] = None  # null: when TE imports on a GPU; true: required
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "current"] = "delayed"  # current = per-tensor current scaling
    fp8_amax_history_len: int = 1024  # delayed scaling only


@dataclass
class GroveConfig:
    """The whole run: one object, built only by :func:`load_config`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)


# --------------------------------------------------------------------------------------
# building and checking
# --------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` checked against annotation ``tp`` (ints accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list:
        if isinstance(value, list):
            return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix}{unknown[0]}; allowed in {prefix.rstrip('.') or 'config'}: "
            f"{', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, tp)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected dotted key=value, e.g. train.iters=20")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Merge dotted ``key=value`` strings (values parsed as YAML scalars) into ``data``."""
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(path[:i + 1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _merge(base: dict, child: dict) -> dict:
    """``child``'s keys over ``base``'s, section by section."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml_config(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The YAML file at ``path`` as a dict, with its ``base:`` (a YAML file, relative to this
    one's folder) read first and this file's keys laid over it, section by section."""
    path = Path(path)
    if not path.is_file():
        where = f" (base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"--config {path}{where}: no such file")
    if path.resolve() in _chain:
        raise ConfigError(f"--config {path}: its base: chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path}: not valid YAML ({str(exc).splitlines()[0]})")
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of sections, got {data!r}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"--config {path}: base={base!r}: expected the path of another YAML")
    return _merge(read_yaml_config(path.parent / base, (*_chain, path.resolve())), data)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> GroveConfig:
    """Read a YAML file (following its ``base:``; defaults when ``path`` is None), apply
    overrides, type-check and validate everything that does not depend on the world size."""
    data = read_yaml_config(path) if path is not None else {}
    cfg = _build(GroveConfig, apply_overrides(data, list(overrides or [])), "")
    _validate(cfg)
    return cfg


def config_to_dict(cfg: GroveConfig) -> dict:
    """Plain-dict view of the config (for logging and checkpoints)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> GroveConfig:
    """Inverse of :func:`config_to_dict` (e.g. the config stored in a checkpoint), validated."""
    cfg = _build(GroveConfig, data, "")
    _validate(cfg)
    return cfg


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _validate(cfg: GroveConfig) -> None:
    m, e, t, p = cfg.model, cfg.moe, cfg.train, cfg.parallel
    for key, value in [("model.num_layers", m.num_layers), ("model.hidden_size", m.hidden_size),
                       ("model.num_attention_heads", m.num_attention_heads),
                       ("model.seq_length", m.seq_length),
                       ("train.iters", t.iters), ("train.global_batch_size", t.global_batch_size),
                       ("train.micro_batch_size", t.micro_batch_size),
                       ("parallel.tensor_model_parallel_size", p.tensor_model_parallel_size),
                       ("parallel.expert_model_parallel_size", p.expert_model_parallel_size),
                       ("parallel.pipeline_model_parallel_size", p.pipeline_model_parallel_size),
                       ("parallel.context_parallel_size", p.context_parallel_size)]:
        _require(value >= 1, f"{key}={value}: must be >= 1")
    _require(p.ranks_per_node is None or p.ranks_per_node >= 1,
             f"parallel.ranks_per_node={p.ranks_per_node}: must be >= 1 or null (torchrun's "
             "LOCAL_WORLD_SIZE)")
    _require(p.expert_tensor_parallel_size is None or p.expert_tensor_parallel_size >= 1,
             f"parallel.expert_tensor_parallel_size={p.expert_tensor_parallel_size}: must be "
             ">= 1 or null")
    _require(e.num_experts >= 0, f"moe.num_experts={e.num_experts}: must be >= 0 (0 = dense model)")
    if e.num_experts:
        for key, value in [("moe.router_topk", e.router_topk),
                           ("moe.ffn_hidden_size", e.ffn_hidden_size)]:
            _require(value >= 1, f"{key}={value}: must be >= 1")
    for key, value in [("model.num_query_groups", m.num_query_groups),
                       ("model.kv_channels", m.kv_channels), ("model.vocab_size", m.vocab_size)]:
        _require(value is None or value >= 1, f"{key}={value}: must be >= 1 or null")
    for key, value in [("model.rotary_base", m.rotary_base), ("train.adam_eps", t.adam_eps),
                       ("model.norm_epsilon", m.norm_epsilon),
                       ("model.init_method_std", m.init_method_std)]:
        _require(math.isfinite(value) and value > 0, f"{key}={value}: must be a finite number > 0")
    for key, value in [("train.lr", t.lr), ("train.min_lr", t.min_lr),
                       ("train.weight_decay", t.weight_decay), ("train.clip_grad", t.clip_grad)]:
        _require(math.isfinite(value) and value >= 0,
                 f"{key}={value}: must be a finite number >= 0")
    _require(t.min_lr <= t.lr, f"train.min_lr={t.min_lr}: must be <= train.lr={t.lr}")
    for key, value in [("train.adam_beta1", t.adam_beta1), ("train.adam_beta2", t.adam_beta2)]:
        _require(0 <= value < 1, f"{key}={value}: allowed 0 <= value < 1")
    _require(t.max_skipped_steps >= 0,
             f"train.max_skipped_steps={t.max_skipped_steps}: must be >= 0")
    _require(m.hidden_size % m.num_attention_heads == 0 or m.kv_channels is not None,
             f"model.hidden_size={m.hidden_size}: must be divisible by model.num_attention_heads="
             f"{m.num_attention_heads} (or set model.kv_channels)")
    if m.num_query_groups is not None:
        _require(m.num_attention_heads % m.num_query_groups == 0,
                 f"model.num_query_groups={m.num_query_groups}: must divide "
                 f"model.num_attention_heads={m.num_attention_heads}")
    _require(e.router_topk <= e.num_experts or not e.num_experts,
             f"moe.router_topk={e.router_topk}: must be <= moe.num_experts={e.num_experts}")
    _require(not (e.num_experts and e.router_topk == 1 and e.router_score_function == "softmax"
                  and e.router_type == "grove"),
             "moe.router_topk=1 with moe.router_score_function=softmax: the renormalised "
             "weight is always 1 (no router gradient); use router_score_function=sigmoid or topk >= 2")
    _require(0 <= e.first_k_dense_layers <= m.num_layers,
             f"moe.first_k_dense_layers={e.first_k_dense_layers}: allowed 0..{m.num_layers}")
    _require(e.num_expert_groups >= 0, f"moe.num_expert_groups={e.num_expert_groups}: must be >= 0")
    _require(e.num_experts or not e.num_expert_groups,
             f"moe.num_expert_groups={e.num_expert_groups}: a dense model (moe.num_experts=0) "
             "has no expert groups; set it to 0")
    if e.num_expert_groups:
        G, E = e.num_expert_groups, e.num_experts
        _require(E % G == 0, f"moe.num_expert_groups={G}: must divide moe.num_experts={E} "
                             f"(allowed: {', '.join(str(d) for d in range(1, E + 1) if E % d == 0)})")
        _require(e.adjugate_ffn_hidden_size >= 1,
                 f"moe.adjugate_ffn_hidden_size={e.adjugate_ffn_hidden_size}: must be >= 1")
        _require(e.adjugate_scale >= 0, f"moe.adjugate_scale={e.adjugate_scale}: must be >= 0")
        _require(e.adjugate_scale <= G / E + 1e-12 or e.allow_large_adjugate_scale,
                 f"moe.adjugate_scale={e.adjugate_scale}: the paper requires lam <= G/E = "
                 f"{G / E:g}; lower it or set moe.allow_large_adjugate_scale=true")
    elif e.token_dispatcher_type.startswith("grove_"):
        raise ConfigError(f"moe.token_dispatcher_type={e.token_dispatcher_type} needs "
                          "moe.num_expert_groups > 0")
    if e.router_type in ("cmoe", "cmoe_linear"):
        _require(e.aux_loss_coeff == 0,
                 f"moe.router_type={e.router_type}: CMoE has no aux loss; set "
                 "moe.aux_loss_coeff=0")
        _require(e.norm_topk_prob and e.expert_bias_in_selection,
                 f"moe.router_type={e.router_type}: CMoE weighs experts by 1 + s*u and selects "
                 "with its bias; "
                 "moe.norm_topk_prob and moe.expert_bias_in_selection must stay true")
    _require(e.shared_expert_ffn_hidden_size is None or e.shared_expert_ffn_hidden_size >= 1,
             f"moe.shared_expert_ffn_hidden_size={e.shared_expert_ffn_hidden_size}: must be "
             ">= 1 or null")
    _require(e.bias_update_rate >= 0, f"moe.bias_update_rate={e.bias_update_rate}: must be >= 0")
    _require(t.global_batch_size % t.micro_batch_size == 0,
             f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
             f"train.micro_batch_size={t.micro_batch_size}")
    _require(0 <= t.lr_warmup_iters < t.iters,
             f"train.lr_warmup_iters={t.lr_warmup_iters}: must be < train.iters={t.iters} "
             f"(allowed 0..{t.iters - 1})")
    _require(t.exit_at_iter is None or 1 <= t.exit_at_iter <= t.iters,
             f"train.exit_at_iter={t.exit_at_iter}: allowed 1..train.iters={t.iters} or null")
    _require(cfg.checkpoint.load != "auto" or cfg.checkpoint.save is not None,
             "checkpoint.load=auto: resumes from checkpoint.save, which is not set; set "
             "checkpoint.save=DIR")
    _require(cfg.runtime.dist_timeout_s >= 1,
             f"runtime.dist_timeout_s={cfg.runtime.dist_timeout_s}: must be >= 1")
    _require(cfg.checkpoint.lock_stale_s >= 1,
             f"checkpoint.lock_stale_s={cfg.checkpoint.lock_stale_s}: must be >= 1")
    lg = cfg.logging
    _require(lg.straggler_interval >= 0 and lg.straggler_factor > 1 and lg.straggler_intervals >= 1,
             f"logging.straggler_interval={lg.straggler_interval} / straggler_factor="
             f"{lg.straggler_factor} / straggler_intervals={lg.straggler_intervals}: need >= 0 "
             "(0: off), > 1 and >= 1")
    hang = cfg.runtime.hang_timeout_s
    _require(hang is None or 1 <= hang < cfg.runtime.dist_timeout_s,
             f"runtime.hang_timeout_s={hang}: allowed 1..runtime.dist_timeout_s-1="
             f"{cfg.runtime.dist_timeout_s - 1} (a hang must be named before a collective "
             "times out) or null (no watchdog)")
    _require(cfg.checkpoint.save_interval >= 0,
             f"checkpoint.save_interval={cfg.checkpoint.save_interval}: must be >= 0")
    _require(cfg.logging.log_interval >= 1,
             f"logging.log_interval={cfg.logging.log_interval}: must be >= 1")
    _require(t.eval_interval >= 1, f"train.eval_interval={t.eval_interval}: must be >= 1")
    _require(t.eval_iters >= 0,
             f"train.eval_iters={t.eval_iters}: must be >= 0 (0 = no validation)")
    _validate_data(cfg.data)
    _require(cfg.logging.peak_tflops is None or cfg.logging.peak_tflops > 0,
             f"logging.peak_tflops={cfg.logging.peak_tflops}: must be > 0 or null (null: the "
             "known peak of the GPU, none on CPU)")
    _validate_pipeline(p, m.num_layers)
    if p.recompute_granularity == "full":
        _require(1 <= p.recompute_num_layers <= m.num_layers,
                 f"parallel.recompute_num_layers={p.recompute_num_layers}: allowed 1.."
                 f"model.num_layers={m.num_layers} with parallel.recompute_granularity=full")
    _require(not (p.tensor_model_parallel_size > 1 and e.num_experts and not p.sequence_parallel),
             f"parallel.tensor_model_parallel_size={p.tensor_model_parallel_size}: MoE with tensor "
             "parallelism needs parallel.sequence_parallel=true (as in Megatron-Core)")


def _validate_pipeline(p: ParallelConfig, num_layers: int) -> None:
    """Megatron's rules for splitting ``num_layers`` over the pipeline stages and chunks."""
    pp, vpp = p.pipeline_model_parallel_size, p.virtual_pipeline_model_parallel_size
    first, last = p.num_layers_in_first_pipeline_stage, p.num_layers_in_last_pipeline_stage
    _require(vpp is None or (vpp >= 2 and pp >= 2),
             f"parallel.virtual_pipeline_model_parallel_size={vpp}: needs >= 2 chunks and "
             "parallel.pipeline_model_parallel_size >= 2 (null: no interleaving)")
    for key, value in (("num_layers_in_first_pipeline_stage", first),
                       ("num_layers_in_last_pipeline_stage", last)):
        _require(value is None or (pp >= 2 and value >= 1),
                 f"parallel.{key}={value}: needs parallel.pipeline_model_parallel_size >= 2 and "
                 "a value >= 1 (null: an even share)")
    middle_stages = pp - (first is not None) - (last is not None)
    middle_layers = num_layers - (first or 0) - (last or 0)
    shares = [v for v in (first, last) if v is not None]
    if middle_stages:
        shares.append(middle_layers // middle_stages)
    _require(middle_layers >= 0 and (middle_layers % middle_stages == 0 if middle_stages
                                     else middle_layers == 0)
             and all(share >= 1 and share % (vpp or 1) == 0 for share in shares),
             f"model.num_layers={num_layers}: cannot be split over "
             f"parallel.pipeline_model_parallel_size={pp} stages"
             + (f" x virtual_pipeline_model_parallel_size={vpp} chunks" if vpp else "")
             + f" (first stage {first}, last stage {last}); every stage needs the same number of "
             "layers, a multiple of the chunks per stage; set "
             "parallel.num_layers_in_first_pipeline_stage / num_layers_in_last_pipeline_stage "
             "for a count that does not divide")


# The routing choices that change the function a set of weights computes (checked on resume).
ROUTING_KEYS = ("router_score_function", "norm_topk_prob", "expert_bias_in_selection")


def routing_differences(saved: dict, cfg: GroveConfig) -> list[str]:
    """The :data:`ROUTING_KEYS` on which ``saved`` (a stored config dict, e.g. a checkpoint's)
    and ``cfg`` differ, each as ``'moe.KEY=SAVED (this run: VALUE)'``; a key the stored config
    predates counts as its default."""
    stored, defaults = saved.get("moe") or {}, MoEConfig()
    out = []
    for key in ROUTING_KEYS:
        was, now = stored.get(key, getattr(defaults, key)), getattr(cfg.moe, key)
        if was != now:
            out.append(f"moe.{key}={_yaml_scalar(was)} (this run: {_yaml_scalar(now)})")
    return out


def _yaml_scalar(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


DEFAULT_SPLIT = "98,2,0"
SPLIT_PARTS = ("train", "validation", "test")


def split_shares(split: str) -> list[float]:
    """Megatron's reading of a split string: ``"98,2,0"`` -> ``[0.98, 0.02, 0.0]`` (up to three
    non-negative weights, normalised; missing ones are 0). ConfigError if it is not one."""
    try:
        values = [float(v) for v in split.split(",")]
    except ValueError:
        values = []
    _require(1 <= len(values) <= 3 and all(math.isfinite(v) and v >= 0 for v in values)
             and sum(values) > 0,
             f"data.split={split!r}: expected Megatron's split string train,valid,test of "
             "non-negative shares, e.g. \"98,2,0\"")
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


def _check_source(key: str, value: Any) -> None:
    """A data source: a non-empty prefix, or a non-empty list of [weight > 0, prefix] pairs."""
    example = f"e.g. {key}=[[0.7,data/web],[0.3,data/books]]"
    if isinstance(value, str):
        _require(value.strip() != "", f"{key}: empty; expected a dataset prefix or a blend, "
                                      f"{example}")
        return
    _require(len(value) > 0, f"{key}=[]: an empty blend; expected [[weight, prefix], ...], "
                             f"{example}")
    for i, entry in enumerate(value):
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], str)
              and entry[1].strip() != "" and isinstance(entry[0], (int, float))
              and not isinstance(entry[0], bool) and entry[0] > 0)
        _require(ok, f"{key}[{i}]={entry!r}: expected [weight, prefix] with a weight > 0, "
                     f"{example}")


def _validate_data(d: DataConfig) -> None:
    for key, value in (("data.path", d.path), ("data.valid_path", d.valid_path)):
        if value is not None:
            _check_source(key, value)
    if d.split is None:
        return
    _require(d.valid_path is None,
             f"data.split={d.split}: with data.valid_path the validation data is given "
             "separately and data.path is trained on whole; set one of the two")
    _require(split_shares(d.split)[0] > 0, f"data.split={d.split}: the training share must be > 0")



def validate_layout(cfg: GroveConfig, world_size: int) -> int:
    """Check the parallel layout against the world size; return the data-parallel size.

    Megatron's two grids: attention and dense layers on TP x CP x PP x DP ranks, experts on
    ETP x EP x PP x expert-DP ranks (the same ranks, factored differently)."""
    p, e, t = cfg.parallel, cfg.moe, cfg.train
    tp, ep, pp = (p.tensor_model_parallel_size, p.expert_model_parallel_size,
                  p.pipeline_model_parallel_size)
    cp, etp = p.context_parallel_size, p.expert_tensor_parallel
    _require(world_size % (tp * cp * pp) == 0,
             f"parallel.tensor_model_parallel_size={tp} x context_parallel_size={cp} x "
             f"pipeline_model_parallel_size={pp}: must divide the world size {world_size}")
    _require(p.ranks_per_node is None or world_size % p.ranks_per_node == 0,
             f"parallel.ranks_per_node={p.ranks_per_node}: must divide the world size "
             f"{world_size} (ranks per node; default: torchrun's LOCAL_WORLD_SIZE)")
    dp = world_size // (tp * cp * pp)
    # the ranks EP spreads over: the DP size when experts share attention's TP and there is no CP
    slots = world_size // (etp * pp)
    if etp == tp and cp == 1:
        what = f"the data-parallel size {dp} (= world size {world_size} / (tp {tp} x pp {pp}))"
    else:
        what = (f"world size {world_size} / (expert_tensor_parallel_size {etp} x pp {pp}) = "
                f"{slots}")
    _require(world_size % (etp * pp) == 0 and slots % ep == 0,
             f"parallel.expert_model_parallel_size={ep}: must divide {what}; allowed: "
             f"{', '.join(str(d) for d in range(1, slots + 1) if slots % d == 0) or 'none'}")
    _require(e.num_experts > 0 or (ep == 1 and p.expert_tensor_parallel_size is None),
             f"parallel.expert_model_parallel_size={ep}: a dense model (moe.num_experts=0) has "
             "no experts to distribute; allowed: 1 (and expert_tensor_parallel_size null)")
    _require(e.num_experts % ep == 0,
             f"parallel.expert_model_parallel_size={ep}: must divide moe.num_experts="
             f"{e.num_experts}")
    if e.num_expert_groups:
        _require(e.num_expert_groups % ep == 0,
                 f"parallel.expert_model_parallel_size={ep}: must divide moe.num_expert_groups="
                 f"{e.num_expert_groups} so that whole groups (and their adjugate) live on a rank")
    _require(t.global_batch_size % (t.micro_batch_size * dp) == 0,
             f"train.global_batch_size={t.global_batch_size}: must be a multiple of "
             f"micro_batch_size {t.micro_batch_size} x data-parallel size {dp}")
    micro = t.global_batch_size // (t.micro_batch_size * dp)
    _require(not p.virtual_pipeline_model_parallel_size or micro % pp == 0,
             f"train.global_batch_size={t.global_batch_size}: the interleaved pipeline schedule "
             f"needs a multiple of pipeline_model_parallel_size {pp} micro-batches per "
             f"data-parallel rank (now {micro} = global_batch_size / (micro_batch_size "
             f"{t.micro_batch_size} x data-parallel size {dp}))")
    return dp
