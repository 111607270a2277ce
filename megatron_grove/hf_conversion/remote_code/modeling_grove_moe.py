# Copyright the megatron-grove authors. Apache-2.0.
"""GroveMoE for Hugging Face ``transformers`` (5.x): ``GroveMoeForCausalLM``, written from the
Grove MoE formula (megatron-grove's docs/design.md, "Grove MoE") on ``transformers``' public
base classes (``PreTrainedModel``, ``GenerationMixin``, ``DynamicCache``). Shipped with every
GroveMoE export of megatron-grove; load with
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``.

Decoder layer: ``h = x + Attn(RMSNorm(x))``, ``y = h + FFN(RMSNorm(h))``. Attention: grouped
query attention, per-head RMSNorm on queries and keys (QK-norm), rotary embeddings (rotate-half
layout), softmax scale ``head_dim ** -0.5``, no biases. FFN: a SwiGLU MLP
``down(silu(gate(x)) * up(x))`` in the first dense layers (``mlp_only_layers``), elsewhere a
Grove MoE block: for a token ``x`` with router logits ``l = W_r x`` over ``E`` experts

* selection ``S`` = top-k of ``sigmoid(l) + b`` (``b`` = ``mlp.expert_bias``, only when
  ``expert_bias_in_selection``; without it top-k of ``sigmoid(l)``);
* weights ``rho`` = ``softmax(l)`` over all ``E`` gathered at ``S`` (``scoring_func: softmax``)
  or ``sigmoid(l)`` at ``S`` (``sigmoid``), divided by their sum when ``norm_topk_prob``
  (sigmoid with top-1 is never renormalised);
* ``y = sum_{i in S} rho_i E_i(x) + lam * sum_{groups j hit} (sum_{i in S ∩ G_j} rho_i) A_j(x)``
  with group ``j`` = experts ``j*n .. (j+1)*n - 1`` (``n = E / G``), ``A_j`` its adjugate
  (``mlp.chunk_experts.{j}``), evaluated once per (token, group), ``lam = adjugate_scale``.

Routing runs in fp32. Tensor names: ``model.embed_tokens``, ``model.layers.{i}.{input_layernorm,
post_attention_layernorm}``, ``...self_attn.{q,k,v,o}_proj``, ``...self_attn.{q,k}_norm``,
``...mlp.{gate,up,down}_proj`` (dense), ``...mlp.gate``, ``...mlp.expert_bias``,
``...mlp.experts.{e}.{gate,up,down}_proj``, ``...mlp.chunk_experts.{g}.{gate,up,down}_proj``,
``model.norm``, ``lm_head``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_grove_moe import GroveMoeConfig

__all__ = ["GroveMoeModel", "GroveMoeForCausalLM", "GroveMoePreTrainedModel"]

# The output field that carries the KV cache: "cache" in recent transformers 5 releases,
# "past_key_values" before.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else (
    "past_key_values")


class GroveMoeRMSNorm(nn.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight`` over the last dimension, computed in fp32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class GroveMoeMLP(nn.Module):
    """SwiGLU: ``[..., H] -> down(silu(gate(x)) * up(x)) [..., H]``."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class GroveMoeRotary(nn.Module):
    """Rotary angles for positions ``[B, n]`` -> (cos, sin) ``[B, 1, n, d]``."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        angles = positions[..., None].float() * self.inv_freq.float()
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        return angles.cos().to(dtype), angles.sin().to(dtype)


class GroveMoeAttention(nn.Module):
    """Grouped-query self-attention with QK-norm and rotary embeddings; KV cache through a
    ``transformers`` ``Cache`` (``update(k, v, layer_idx)``)."""

    def __init__(self, config: GroveMoeConfig, layer_idx: int) -> None:
        super().__init__()
        H, d = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.heads, self.kv_heads, self.head_dim = (config.num_attention_heads,
                                                    config.num_key_value_heads, d)
        self.q_proj = nn.Linear(H, self.heads * d, bias=False)
        self.k_proj = nn.Linear(H, self.kv_heads * d, bias=False)
        self.v_proj = nn.Linear(H, self.kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.heads * d, H, bias=False)
        self.q_norm = GroveMoeRMSNorm(d, config.rms_norm_eps)
        self.k_norm = GroveMoeRMSNorm(d, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, cache=None) -> torch.Tensor:
        """``x`` ``[B, n, H]``, ``mask`` additive ``[B, 1, n, past + n]`` -> ``[B, n, H]``."""
        B, n, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, n, self.heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(B, n, self.kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, n, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rotary
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        repeat = self.heads // self.kv_heads
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        scores = (q @ k.transpose(2, 3)) * self.head_dim ** -0.5 + mask
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, n, self.heads * self.head_dim)
        return self.o_proj(out)


class GroveMoeSparseBlock(nn.Module):
    """The Grove MoE block (module docstring): ``[B, n, H] -> [B, n, H]``."""

    def __init__(self, config: GroveMoeConfig) -> None:
        super().__init__()
        H, E = config.hidden_size, config.num_experts
        self.top_k = config.num_experts_per_tok
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.bias_in_selection = config.expert_bias_in_selection
        self.num_groups = config.num_expert_groups
        self.adjugate_scale = config.adjugate_scale
        self.gate = nn.Linear(H, E, bias=False)
        self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
        self.experts = nn.ModuleList(GroveMoeMLP(H, config.moe_intermediate_size)
                                     for _ in range(E))
        self.chunk_experts = nn.ModuleList(GroveMoeMLP(H, config.adjugate_intermediate_size)
                                           for _ in range(self.num_groups))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``[T, H]`` -> (selected experts ``[T, k]``, their weights ``[T, k]`` fp32)."""
        logits = F.linear(x.float(), self.gate.weight.float())
        selection = torch.sigmoid(logits)
        if self.bias_in_selection:
            selection = selection + self.expert_bias.float()
        chosen = selection.topk(self.top_k, dim=-1).indices
        if self.scoring_func == "softmax":
            weights = torch.softmax(logits, dim=-1).gather(-1, chosen)
        else:
            weights = torch.sigmoid(logits).gather(-1, chosen)
        if self.norm_topk_prob and (self.scoring_func == "softmax" or self.top_k > 1):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, hidden.shape[-1])
        chosen, weights = self.route(x)
        out = torch.zeros_like(x)
        for expert in chosen.unique().tolist():
            rows, slot = (chosen == expert).nonzero(as_tuple=True)
            y = self.experts[expert](x[rows]) * weights[rows, slot, None].to(x.dtype)
            out.index_add_(0, rows, y)
        if self.num_groups:
            group = chosen // (len(self.experts) // self.num_groups)
            group_weight = torch.zeros(x.shape[0], self.num_groups, dtype=weights.dtype,
                                       device=x.device).scatter_add_(1, group, weights)
            hit = torch.zeros_like(group_weight, dtype=torch.bool).scatter_(1, group, True)
            for g in hit.any(dim=0).nonzero().flatten().tolist():
                rows = hit[:, g].nonzero().flatten()
                scale = (self.adjugate_scale * group_weight[rows, g, None]).to(x.dtype)
                out.index_add_(0, rows, self.chunk_experts[g](x[rows]) * scale)
        return out.reshape(hidden.shape)


class GroveMoeDecoderLayer(nn.Module):
    def __init__(self, config: GroveMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = GroveMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = GroveMoeAttention(config, layer_idx)
        self.post_attention_layernorm = GroveMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        dense = config.num_experts == 0 or layer_idx in config.mlp_only_layers
        self.mlp = (GroveMoeMLP(config.hidden_size, config.intermediate_size) if dense
                    else GroveMoeSparseBlock(config))

    def forward(self, x: torch.Tensor, rotary, mask: torch.Tensor, cache=None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GroveMoePreTrainedModel(PreTrainedModel):
    config_class = GroveMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["GroveMoeDecoderLayer"]
    _supports_cache_class = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, GroveMoeRMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, GroveMoeSparseBlock):
            module.expert_bias.zero_()
        elif isinstance(module, GroveMoeRotary):
            head_dim = self.config.head_dim
            module.inv_freq.copy_(1.0 / (self.config.rope_theta ** (
                torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)))


def _causal_mask(attention_mask: torch.Tensor | None, batch: int, n: int, past: int,
                 dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Additive mask ``[B, 1, n, past + n]``: query ``i`` sees keys ``<= past + i`` that the 2-D
    ``attention_mask`` (``[B, past + n]``, 1 = token, 0 = padding) keeps."""
    keys = torch.arange(past + n, device=device)
    allowed = keys[None, :] <= (past + torch.arange(n, device=device))[:, None]
    allowed = allowed[None, None].expand(batch, 1, n, past + n)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, -(past + n):].bool()
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


class GroveMoeModel(GroveMoePreTrainedModel):
    """Embeddings, decoder layers and final norm: ``input_ids [B, n] -> hidden [B, n, H]``."""

    def __init__(self, config: GroveMoeConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GroveMoeDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = GroveMoeRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = GroveMoeRotary(config.head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                past_key_values=None, **kwargs) -> BaseModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        B, n = x.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:  # left padding: count real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)[:, -n:]
            else:
                position_ids = torch.arange(past, past + n, device=x.device)[None].expand(B, n)
        rotary = self.rotary(position_ids, x.dtype)
        mask = _causal_mask(attention_mask, B, n, past, x.dtype, x.device)
        for layer in self.layers:
            x = layer(x, rotary, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(x),
                                       **{_CACHE_FIELD: cache if use_cache else None})


class GroveMoeForCausalLM(GroveMoePreTrainedModel, GenerationMixin):
    """``input_ids [B, n] -> logits [B, n, V]`` (fp32 loss from ``labels``, shifted inside)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: GroveMoeConfig) -> None:
        super().__init__(config)
        self.model = GroveMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(self, input_ids: torch.LongTensor | None = None,
                attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, cache=None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                past_key_values=None, **kwargs) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, cache=cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, past_key_values=past_key_values)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits,
                                      **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
