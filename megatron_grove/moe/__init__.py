"""Grove MoE on Megatron-Core: the layer, its routers and balancing, its token dispatchers.

* :mod:`.layer` — :class:`GroveMoELayer`, Megatron's ``MoELayer`` + one adjugate per group;
* :mod:`.layout` — where experts and adjugates live under expert parallelism;
* :mod:`.dispatchers` — one dispatcher interface, one class per strategy (adjugates as extra
  experts of Megatron's all-to-all / all-gather; group-aware all-to-all);
* :mod:`.router` — :class:`GroveTopKRouter` (Megatron's ``TopKRouter`` + expert bias);
* :mod:`.balancing` — aux-loss-free expert-bias updates (paper or Megatron rule);
* :mod:`.counters` — per-step work counters for the metrics log;
* :mod:`.spec` — :func:`build_moe_layer` and the hook into Megatron's layer spec.
"""

from megatron_grove.moe.layer import GroveMoELayer
from megatron_grove.moe.layout import ExpertLayout
from megatron_grove.moe.router import GroveTopKRouter
from megatron_grove.moe.spec import build_moe_layer

__all__ = ["GroveMoELayer", "ExpertLayout", "GroveTopKRouter", "build_moe_layer"]
