"""megatron-grove: expert-parallel training of Grove MoE language models on Megatron-Core."""

from megatron_grove.third_party_output import quiet_third_party

__version__ = "0.1.0"

quiet_third_party()  # before anything imports Megatron
