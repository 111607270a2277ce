"""The Megatron ``GPTModel`` of a run (:mod:`.gpt`) and its decoder layer spec
(:mod:`.layer_spec`: Megatron's GPT spec with our MoE layers plugged in)."""

from megatron_grove.model.gpt import (
                                      build_gpt_model,
                                      causal_attention_mask,
                                      gpt_logits,
                                      init_params_layout_independent,
                                      padded_vocab_size,
)

__all__ = ["build_gpt_model", "causal_attention_mask", "gpt_logits", "padded_vocab_size",
           "init_params_layout_independent"]
