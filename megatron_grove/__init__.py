"""megatron-grove: expert-parallel training of Grove MoE language models on Megatron-Core."""

__version__ = "0.1.0"
