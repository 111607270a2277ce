"""CMoE's routers for carved models: their scores, biased selection, weight 1 + s*u.

For ``T`` tokens ``x`` ``[T, H]`` and ``E`` routed experts the router computes logits
``l`` ``[T, E]``:

* :class:`CMoELinearRouter` (``moe.router_type: cmoe_linear``, the carving tool's default):
  ``l = x W^T + c`` (``weight`` ``[E, H]``, ``score_bias`` ``[E]``, fitted by ridge regression
  at carving, :func:`megatron_grove.carving.router_fit.linear_router`);
* :class:`CMoERouter` (``moe.router_type: cmoe``, the paper's): each expert keeps the gate and
  up rows of its representative neuron (``weight`` ``[E, H]``, ``up_weight`` ``[E, H]``, both
  L2-normalised at carving), ``l = |silu(weight_e . x) * (up_weight_e . x)|``.

Both then route alike:

* score ``s = softmax_e l`` ``[T, E]``;
* selection = top-k of ``s + b`` with ``b`` the ``expert_bias`` buffer (selection only, no
  gradient; updated by :func:`megatron_grove.moe.balancing.update_expert_bias` like Grove's);
* weight of a selected expert ``1 + s_e * u_e`` with the learnable ``expert_scale`` ``u``
  ``[E]`` (0 at carving, so a freshly carved model weighs every selected expert by exactly 1
  and, with every expert selected, computes the dense FFN).

They are :class:`~megatron_grove.moe.router.GroveTopKRouter` s (so the trainer's token counting
and bias balancing apply unchanged) whose ``gating`` and ``routing`` are CMoE's. Every
parameter and ``expert_bias`` is saved in checkpoints with the router weight.
Megatron's optional routing extras (aux losses, z-loss, token dropping, routing replay) are not
part of CMoE; the config rejects them (see :func:`megatron_grove.config.load_config`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_grove.megatron_config import GroveTransformerConfig
from megatron_grove.moe.router import GroveTopKRouter

__all__ = ["CMoERouter", "CMoELinearRouter"]


class _CMoERouting(GroveTopKRouter):
    """The routing both CMoE routers share (module docstring); subclasses define ``gating``."""

    def __init__(self, config: GroveTransformerConfig,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 is_mtp_layer: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.router_replay = None  # CMoE selects by its own biased softmax (routing below)
        self.expert_scale = self._router_parameter(torch.zeros(self.weight.shape[0]))

    def _router_parameter(self, value: torch.Tensor) -> torch.nn.Parameter:
        param = torch.nn.Parameter(value.to(dtype=self.config.params_dtype,
                                            device=self.weight.device))
        setattr(param, "sequence_parallel", self.config.sequence_parallel)
        return param

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``[S, B, E]`` -> (probs, routing_map) ``[S*B, E]``."""
        scores = torch.softmax(logits.reshape(-1, self.config.num_moe_experts), dim=-1)
        selection = scores.detach() if self.expert_bias is None else (
            scores.detach() + self.expert_bias)
        index = selection.topk(self.topk, dim=-1).indices
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, index, True)
        probs = torch.where(routing_map, 1 + scores * self.expert_scale.float(),
                            torch.zeros_like(scores))
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        self._apply_expert_bias(routing_map, padding_mask=padding_mask)
        return probs, routing_map


class CMoERouter(_CMoERouting):
    """``forward(input [S, B, H], padding_mask=None) -> (probs [S*B, E], routing_map [S*B, E])``
    with the paper's representative-neuron logits (module docstring)."""

    def __init__(self, config: GroveTransformerConfig,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 is_mtp_layer: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.up_weight = self._router_parameter(torch.empty(self.weight.shape))
        if config.perform_initialization:
            config.init_method(self.up_weight)

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """``input`` ``[S, B, H]`` -> ``|silu(x W^T) * (x U^T)|`` ``[S, B, E]`` (fp32)."""
        x = input.float()
        return (F.silu(x @ self.weight.float().T) * (x @ self.up_weight.float().T)).abs()


class CMoELinearRouter(_CMoERouting):
    """``forward(input [S, B, H], padding_mask=None) -> (probs [S*B, E], routing_map [S*B, E])``
    with linear logits ``x W^T + c`` (module docstring)."""

    def __init__(self, config: GroveTransformerConfig,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 is_mtp_layer: bool = False) -> None:
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        self.score_bias = self._router_parameter(torch.zeros(self.weight.shape[0]))

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """``input`` ``[S, B, H]`` -> ``x W^T + c`` ``[S, B, E]`` (fp32)."""
        return input.float() @ self.weight.float().T + self.score_bias.float()
