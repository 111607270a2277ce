"""Hugging Face ``config.json`` <-> the model part of our :class:`GroveConfig`.

Three architectures are understood (all RMSNorm, SwiGLU, RoPE, no biases):

* dense Llama (``model_type: llama``) and Qwen3 (``qwen3``, with per-head QK-norm);
* Qwen3-MoE (``qwen3_moe``): top-k of ``softmax(W_r x)``, renormalised over the selection when
  ``norm_topk_prob`` (Hugging Face's default: false), optionally the first k layers dense
  (``mlp_only_layers``);
* GroveMoE, in two flavours (:data:`HF_FLAVOURS`):

  - ``default`` (ours): ``model_type: grove_moe``, our modelling code for ``transformers`` 5
    shipped beside the weights (``auto_map``, :mod:`.remote_code`), and every routing choice
    written out: ``num_expert_groups``, ``adjugate_intermediate_size``, ``adjugate_scale``,
    ``scoring_func`` (softmax | sigmoid), ``norm_topk_prob`` and ``expert_bias_in_selection``;
  - ``release``: what the released GroveMoE code loads (:data:`RELEASE_FLAVOUR`: Qwen3-MoE
    fields, 2 experts per group, adjugate size 128 and ``lam = 0.05`` hard-coded in that code,
    which never reads its ``mlp.expert_bias``).

  A checkpoint is GroveMoE when it has ``mlp.chunk_experts`` tensors or Grove fields, whatever
  its ``model_type``. Without ``expert_bias_in_selection`` in ``config.json`` it is read with
  the released code's semantics (:data:`RELEASED_GROVE_DEFAULTS` for missing sizes; softmax
  weights renormalised whatever ``norm_topk_prob`` says; the bias kept but not selecting), so
  it computes what the released code computes.

Anything else the model would compute differently (biases, other activations, rope scaling,
sliding windows) is refused with a :class:`HFFormatError`.
"""

from __future__ import annotations

from typing import Any, Iterable

from megatron_grove.config import GroveConfig, ModelConfig, MoEConfig

__all__ = ["HFFormatError", "RELEASED_GROVE_DEFAULTS", "RELEASE_FLAVOUR", "HF_FLAVOURS",
           "is_grove_checkpoint", "grove_config_from_hf", "hf_config_from_grove",
           "release_incompatibilities"]

RELEASED_GROVE_DEFAULTS = {"experts_per_group": 2, "adjugate_intermediate_size": 128,
                           "adjugate_scale": 0.05}
GROVE_FIELDS = ("num_expert_groups", "adjugate_intermediate_size", "adjugate_scale")
HF_FLAVOURS = ("default", "release")
# What the released GroveMoE checkpoints declare (an assumption: their modelling code patches
# transformers 4.51.3's Qwen3-MoE, whose config class it keeps, and SGLang / llama.cpp look the
# model up by this architecture name; no released config.json was available to check).
RELEASE_FLAVOUR = {"model_type": "qwen3_moe", "architectures": ["GroveMoeForCausalLM"]}


class HFFormatError(ValueError):
    """A Hugging Face checkpoint we cannot read or write exactly; the message says why."""


def is_grove_checkpoint(hf_config: dict[str, Any], tensor_names: Iterable[str]) -> bool:
    """True for a GroveMoE checkpoint: adjugate (``chunk_experts``) tensors or Grove fields."""
    return (any(".mlp.chunk_experts." in name for name in tensor_names)
            or any(key in hf_config for key in GROVE_FIELDS))


def _rope_theta(hf: dict[str, Any]) -> float:
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if rope_type != "default":
        raise HFFormatError(f"config.json: rope_type={rope_type!r} is not supported (only "
                            "plain RoPE, rope_type='default')")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _require(hf: dict[str, Any], key: str, allowed: Any, default: Any = None) -> None:
    value = hf.get(key, default)
    if value != allowed:
        raise HFFormatError(f"config.json: {key}={value!r} is not supported; allowed: {allowed!r}")


def _first_k_dense(hf: dict[str, Any], num_layers: int) -> int:
    dense = sorted(hf.get("mlp_only_layers") or [])
    if dense != list(range(len(dense))) or hf.get("decoder_sparse_step", 1) != 1:
        raise HFFormatError(
            f"config.json: mlp_only_layers={dense}, decoder_sparse_step="
            f"{hf.get('decoder_sparse_step')}: only the first k layers may be dense "
            "(mlp_only_layers=[0, ..., k-1], decoder_sparse_step=1)")
    return min(len(dense), num_layers)


def grove_config_from_hf(hf: dict[str, Any], tensor_names: Iterable[str]) -> GroveConfig:
    """``config.json`` (a dict) and the checkpoint's tensor names -> a :class:`GroveConfig`
    whose ``model`` and ``moe`` sections build the same function with our model code (other
    sections: defaults; ``runtime.dtype`` is left to the caller)."""
    tensor_names = list(tensor_names)
    model_type = hf.get("model_type")
    grove = is_grove_checkpoint(hf, tensor_names)
    if not grove and model_type not in ("llama", "qwen3", "qwen3_moe"):
        raise HFFormatError(f"config.json: model_type={model_type!r} is not supported; "
                            "allowed: llama, qwen3, qwen3_moe, or a GroveMoE checkpoint")
    _require(hf, "hidden_act", "silu", "silu")
    for key in ("attention_bias", "mlp_bias", "use_sliding_window"):
        _require(hf, key, False, False)
    try:
        heads = int(hf["num_attention_heads"])
        model = ModelConfig(
            num_layers=int(hf["num_hidden_layers"]),
            hidden_size=int(hf["hidden_size"]),
            num_attention_heads=heads,
            num_query_groups=int(hf.get("num_key_value_heads") or heads),
            kv_channels=int(hf.get("head_dim") or hf["hidden_size"] // heads),
            ffn_hidden_size=int(hf["intermediate_size"]),
            seq_length=int(hf.get("max_position_embeddings", 4096)),
            vocab_size=int(hf["vocab_size"]),
            rotary_base=_rope_theta(hf),
            norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
            qk_layernorm=model_type != "llama",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        if model_type in ("llama", "qwen3") and not grove:
            moe = MoEConfig(num_experts=0)
        else:
            num_experts = int(hf.get("num_experts") or hf["num_local_experts"])
            moe = MoEConfig(
                num_experts=num_experts,
                router_topk=int(hf["num_experts_per_tok"]),
                ffn_hidden_size=int(hf["moe_intermediate_size"]),
                first_k_dense_layers=_first_k_dense(hf, model.num_layers),
                router_score_function="softmax",
                norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
                bias_update_rule="none",
            )
            if grove:
                _grove_moe_config(hf, moe)
            elif hf.get("scoring_func", "softmax") != "softmax":
                raise HFFormatError(f"config.json: scoring_func={hf['scoring_func']!r} is not "
                                    "supported for qwen3_moe; allowed: 'softmax'")
    except KeyError as exc:
        raise HFFormatError(f"config.json: missing field {exc.args[0]!r}") from None
    return GroveConfig(model=model, moe=moe)


def _grove_moe_config(hf: dict[str, Any], moe: MoEConfig) -> None:
    """The Grove fields of ``config.json`` into ``moe`` (module docstring: ours when
    ``expert_bias_in_selection`` is written, else the released code's semantics)."""
    moe.num_expert_groups = int(hf.get(
        "num_expert_groups", moe.num_experts // RELEASED_GROVE_DEFAULTS["experts_per_group"]))
    moe.adjugate_ffn_hidden_size = int(hf.get(
        "adjugate_intermediate_size", RELEASED_GROVE_DEFAULTS["adjugate_intermediate_size"]))
    moe.adjugate_scale = float(hf.get("adjugate_scale", RELEASED_GROVE_DEFAULTS["adjugate_scale"]))
    moe.allow_large_adjugate_scale = True  # a published model is what it is
    moe.bias_update_rule = "paper"  # the checkpoint carries the expert bias
    if "expert_bias_in_selection" in hf:
        scoring = hf.get("scoring_func", "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise HFFormatError(f"config.json: scoring_func={scoring!r} is not supported; "
                                "allowed: 'softmax', 'sigmoid'")
        moe.router_score_function = scoring
        moe.norm_topk_prob = bool(hf.get("norm_topk_prob", True))
        moe.expert_bias_in_selection = bool(hf["expert_bias_in_selection"])
    else:  # the released code: softmax weights, always renormalised; its bias never read
        moe.norm_topk_prob = True
        moe.expert_bias_in_selection = False


def hf_config_from_grove(cfg: GroveConfig, torch_dtype: str,
                         flavour: str = "default") -> dict[str, Any]:
    """The ``config.json`` dict for our model: ``llama``/``qwen3`` when dense (no / with
    QK-norm), ``qwen3_moe`` for MoE, and for Grove MoE ``grove_moe`` (Qwen3-MoE fields + the
    Grove and routing fields + ``auto_map`` to :mod:`.remote_code`; ``flavour`` ``default``)
    or the released code's fields (``release``; check :func:`release_incompatibilities`
    first). ``torch_dtype``: ``"float32"`` or ``"bfloat16"``."""
    from megatron_grove.hf_conversion import remote_code

    m, e = cfg.model, cfg.moe
    if m.vocab_size is None:
        raise HFFormatError("model.vocab_size is not set in the checkpoint's config")
    out: dict[str, Any] = {
        "vocab_size": m.vocab_size,
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_epsilon,
        "rope_parameters": {"rope_theta": m.rotary_base, "rope_type": "default"},
        "rope_theta": m.rotary_base,
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "dtype": torch_dtype,
    }
    if not e.num_experts:
        model_type = "qwen3" if m.qk_layernorm else "llama"
        arch = "Qwen3ForCausalLM" if m.qk_layernorm else "LlamaForCausalLM"
        out.update(mlp_bias=False)
    else:
        if not m.qk_layernorm:
            raise HFFormatError("an MoE model without QK-norm has no Qwen3-MoE equivalent")
        if e.router_score_function != "softmax" and not e.num_expert_groups:
            raise HFFormatError("moe.router_score_function=sigmoid: Qwen3-MoE routes with "
                                "softmax weights only; the model cannot be written exactly in "
                                "the Qwen3-MoE format")
        model_type, arch = "qwen3_moe", "Qwen3MoeForCausalLM"
        out.update(num_experts=e.num_experts, num_experts_per_tok=e.router_topk,
                   moe_intermediate_size=e.ffn_hidden_size, norm_topk_prob=e.norm_topk_prob,
                   decoder_sparse_step=1, mlp_only_layers=list(range(e.first_k_dense_layers)),
                   use_sliding_window=False, router_aux_loss_coef=e.aux_loss_coeff)
        if e.num_expert_groups and flavour == "release":
            out.update(norm_topk_prob=True, torch_dtype=torch_dtype, **RELEASE_FLAVOUR)
            return out
        if e.num_expert_groups:
            model_type, arch = remote_code.MODEL_TYPE, remote_code.ARCHITECTURE
            out.update(num_expert_groups=e.num_expert_groups,
                       adjugate_intermediate_size=e.adjugate_ffn_hidden_size,
                       adjugate_scale=e.adjugate_scale, scoring_func=e.router_score_function,
                       expert_bias_in_selection=e.expert_bias_in_selection,
                       auto_map=dict(remote_code.AUTO_MAP))
    out.update(model_type=model_type, architectures=[arch])
    return out


def release_incompatibilities(cfg: GroveConfig, bias_selects_nonzero: bool) -> list[str]:
    """What keeps the released GroveMoE code from computing ``cfg``'s model exactly, one phrase
    each (empty: it computes it). ``bias_selects_nonzero``: the checkpoint's expert bias is
    non-zero somewhere and takes part in selection."""
    e = cfg.moe
    if not e.num_expert_groups:
        return ["not a GroveMoE model (moe.num_expert_groups=0)"]
    found = []
    released = RELEASED_GROVE_DEFAULTS
    if e.experts_per_group != released["experts_per_group"]:
        found.append(f"{e.experts_per_group} experts per group (release: "
                     f"{released['experts_per_group']})")
    if e.adjugate_ffn_hidden_size != released["adjugate_intermediate_size"]:
        found.append(f"adjugate size {e.adjugate_ffn_hidden_size} (release: "
                     f"{released['adjugate_intermediate_size']})")
    if e.adjugate_scale != released["adjugate_scale"]:
        found.append(f"adjugate scale {e.adjugate_scale:g} (release: {released['adjugate_scale']})")
    if e.router_score_function != "softmax":
        found.append(f"{e.router_score_function} routing weights (release: softmax)")
    if not e.norm_topk_prob:
        found.append("norm_topk_prob false (release: always renormalised)")
    if bias_selects_nonzero:
        found.append("a non-zero expert bias used in selection (release: never reads it; "
                     "--drop-expert-bias drops it from selection)")
    return found
