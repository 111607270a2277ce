"""Hugging Face ``config.json`` <-> the model part of our :class:`GroveConfig`.

Three architectures are understood (all RMSNorm, SwiGLU, RoPE, no biases):

* dense Llama (``model_type: llama``) and Qwen3 (``qwen3``, with per-head QK-norm);
* Qwen3-MoE (``qwen3_moe``): top-k of ``softmax(W_r x)`` renormalised over the selection
  (``norm_topk_prob: true``), optionally the first k layers dense (``mlp_only_layers``);
* GroveMoE: the Qwen3-MoE config plus ``num_expert_groups``, ``adjugate_intermediate_size`` and
  ``adjugate_scale`` (the released model omits them and hard-codes 2 experts per group, 128 and
  0.05: :data:`RELEASED_GROVE_DEFAULTS`). A checkpoint is GroveMoE when it has
  ``mlp.chunk_experts`` tensors or these fields, whatever its ``model_type``.

Anything else the model would compute differently (biases, other activations, rope scaling,
sliding windows, unnormalised top-k weights) is refused with a :class:`HFFormatError`.
"""

from __future__ import annotations

from typing import Any, Iterable

from megatron_grove.config import GroveConfig, ModelConfig, MoEConfig

__all__ = ["HFFormatError", "RELEASED_GROVE_DEFAULTS", "is_grove_checkpoint",
           "grove_config_from_hf", "hf_config_from_grove"]

RELEASED_GROVE_DEFAULTS = {"experts_per_group": 2, "adjugate_intermediate_size": 128,
                           "adjugate_scale": 0.05}
GROVE_FIELDS = ("num_expert_groups", "adjugate_intermediate_size", "adjugate_scale")


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
            if not hf.get("norm_topk_prob", False):
                raise HFFormatError("config.json: norm_topk_prob=false is not supported; our "
                                    "router renormalises the top-k weights (norm_topk_prob=true)")
            moe = MoEConfig(
                num_experts=num_experts,
                router_topk=int(hf["num_experts_per_tok"]),
                ffn_hidden_size=int(hf["moe_intermediate_size"]),
                first_k_dense_layers=_first_k_dense(hf, model.num_layers),
                router_score_function="softmax",
                bias_update_rule="none",
            )
            if grove:
                moe.num_expert_groups = int(hf.get(
                    "num_expert_groups", num_experts // RELEASED_GROVE_DEFAULTS["experts_per_group"]))
                moe.adjugate_ffn_hidden_size = int(hf.get(
                    "adjugate_intermediate_size",
                    RELEASED_GROVE_DEFAULTS["adjugate_intermediate_size"]))
                moe.adjugate_scale = float(hf.get("adjugate_scale",
                                                  RELEASED_GROVE_DEFAULTS["adjugate_scale"]))
                moe.allow_large_adjugate_scale = True  # a released model is what it is
                moe.bias_update_rule = "paper"  # the checkpoint carries the expert bias
    except KeyError as exc:
        raise HFFormatError(f"config.json: missing field {exc.args[0]!r}") from None
    return GroveConfig(model=model, moe=moe)


def hf_config_from_grove(cfg: GroveConfig, torch_dtype: str) -> dict[str, Any]:
    """The ``config.json`` dict for our model: ``llama``/``qwen3`` when dense (no / with
    QK-norm), ``qwen3_moe`` for MoE, ``grove_moe`` (Qwen3-MoE fields + the Grove fields) for
    Grove MoE. ``torch_dtype``: ``"float32"`` or ``"bfloat16"``."""
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
        model_type, arch = "qwen3_moe", "Qwen3MoeForCausalLM"
        out.update(num_experts=e.num_experts, num_experts_per_tok=e.router_topk,
                   moe_intermediate_size=e.ffn_hidden_size, norm_topk_prob=True,
                   decoder_sparse_step=1, mlp_only_layers=list(range(e.first_k_dense_layers)),
                   use_sliding_window=False, router_aux_loss_coef=e.aux_loss_coeff)
        if e.num_expert_groups:
            model_type, arch = "grove_moe", "GroveMoeForCausalLM"
            out.update(num_expert_groups=e.num_expert_groups,
                       adjugate_intermediate_size=e.adjugate_ffn_hidden_size,
                       adjugate_scale=e.adjugate_scale)
    out.update(model_type=model_type, architectures=[arch])
    return out
