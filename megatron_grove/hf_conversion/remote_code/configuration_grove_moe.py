# Copyright the megatron-grove authors. Apache-2.0.
"""GroveMoE configuration for Hugging Face ``transformers`` (5.x), shipped with every GroveMoE
export of megatron-grove and loaded with ``trust_remote_code=True``.

The model (see ``modeling_grove_moe.py``) is a Qwen3-MoE-shaped decoder (RMSNorm, RoPE, grouped
query attention with per-head QK-norm, SwiGLU, no biases) whose MoE layers hold ``num_experts``
routed experts in ``num_expert_groups`` groups of contiguous experts, each group with one small
SwiGLU *adjugate* expert. Fields beyond Qwen3-MoE's:

* ``num_expert_groups`` (G; 0 = no adjugates), ``adjugate_intermediate_size``,
  ``adjugate_scale`` (lam);
* ``scoring_func``: ``"softmax"`` or ``"sigmoid"`` routing weights;
* ``norm_topk_prob``: renormalise the selected experts' weights (sigmoid with top-1 never is);
* ``expert_bias_in_selection``: whether the per-layer ``mlp.expert_bias`` is added to
  ``sigmoid(router logits)`` to choose the experts (it never weighs them).
"""

from transformers import PretrainedConfig

__all__ = ["GroveMoeConfig"]


class GroveMoeConfig(PretrainedConfig):
    model_type = "grove_moe"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(self, vocab_size: int = 151936, hidden_size: int = 2048,
                 intermediate_size: int = 6144, num_hidden_layers: int = 48,
                 num_attention_heads: int = 32, num_key_value_heads: int = 4,
                 head_dim: int = 128, hidden_act: str = "silu",
                 max_position_embeddings: int = 32768, rms_norm_eps: float = 1e-6,
                 rope_theta: float = 1e6, rope_parameters: dict | None = None,
                 initializer_range: float = 0.02, use_cache: bool = True,
                 num_experts: int = 128, num_experts_per_tok: int = 8,
                 moe_intermediate_size: int = 768, mlp_only_layers: list | None = None,
                 num_expert_groups: int = 64, adjugate_intermediate_size: int = 128,
                 adjugate_scale: float = 0.05, scoring_func: str = "softmax",
                 norm_topk_prob: bool = True, expert_bias_in_selection: bool = True,
                 tie_word_embeddings: bool = False, **kwargs) -> None:
        if scoring_func not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring_func={scoring_func!r}: allowed 'softmax', 'sigmoid'")
        if num_expert_groups and num_experts % num_expert_groups:
            raise ValueError(f"num_expert_groups={num_expert_groups} must divide "
                             f"num_experts={num_experts}")
        rope_type = (rope_parameters or {}).get("rope_type", "default")
        if rope_type != "default":
            raise ValueError(f"rope_type={rope_type!r}: only plain RoPE is supported")
        kwargs.pop("rope_scaling", None)
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = float((rope_parameters or {}).get("rope_theta", rope_theta))
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.mlp_only_layers = list(mlp_only_layers or [])
        self.num_expert_groups = num_expert_groups
        self.adjugate_intermediate_size = adjugate_intermediate_size
        self.adjugate_scale = adjugate_scale
        self.scoring_func = scoring_func
        self.norm_topk_prob = norm_topk_prob
        self.expert_bias_in_selection = expert_bias_in_selection
        self.tie_word_embeddings = tie_word_embeddings
