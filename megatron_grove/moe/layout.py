"""Where a Grove MoE layer's routed experts and adjugates live under expert parallelism.

``E`` routed experts form ``G`` groups of ``n = E/G`` contiguous experts (group of expert ``i``
= ``i // n``); each group ``j`` has one adjugate expert ``A_j``. With ``ep`` expert-parallel
ranks (``ep | G``) rank ``r`` holds routed experts ``r*E/ep ... (r+1)*E/ep - 1`` (whole groups)
and the adjugates of exactly those groups, ``r*G/ep ... (r+1)*G/ep - 1``: a group's adjugate
sits beside its experts, so reaching it costs no extra communication.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ExpertLayout"]


@dataclass(frozen=True)
class ExpertLayout:
    """Routed experts and adjugates of one Grove layer on ``ep_size`` ranks."""

    num_experts: int  # E
    num_groups: int  # G
    ep_size: int
    adjugate_scale: float  # lam

    def __post_init__(self) -> None:
        E, G, ep = self.num_experts, self.num_groups, self.ep_size
        if G < 1 or E % G:
            raise ValueError(f"moe_num_expert_groups={G} must divide num_moe_experts={E}")
        if G % ep:
            raise ValueError(f"expert_model_parallel_size={ep} must divide moe_num_expert_groups="
                             f"{G}: a group's experts and its adjugate live on one rank")

    @property
    def experts_per_group(self) -> int:
        """n = E / G."""
        return self.num_experts // self.num_groups

    @property
    def local_experts(self) -> int:
        """Routed experts per EP rank, ``L = E / ep``."""
        return self.num_experts // self.ep_size

    @property
    def local_adjugates(self) -> int:
        """Adjugate experts (groups) per EP rank, ``G / ep``."""
        return self.num_groups // self.ep_size
