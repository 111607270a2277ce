"""Grove MoE's router: Megatron-Core's ``TopKRouter`` with Qwen3/GroveMoE-style expert bias.

For ``T`` tokens, ``E`` experts and logits ``l = W_r x`` (``[T, E]``):

* selection ``S`` = top-k of ``sigmoid(l) + b``, with ``b`` the ``expert_bias`` buffer
  (``[E]``, fp32, starts at 0). The bias only picks experts; it never weights them and gets
  no gradient. Without a bias (``moe_bias_update_rule == 'none'``), or with a bias that does not
  take part in selection (``moe_expert_bias_in_selection=False``: kept in checkpoints and
  exports, as the released GroveMoE code keeps and ignores its own), the selection is top-k of
  the scores, exactly as Megatron's router (top-k of ``sigmoid(l)`` = top-k of ``l``).
* weights: ``softmax`` score function -> ``softmax(l_S)`` (= the softmax over all ``E``
  gathered at ``S`` and renormalised); ``sigmoid`` -> ``sigmoid(l_S) / sum sigmoid(l_S)``
  (with ``k == 1`` Megatron keeps the unnormalised ``sigmoid(l_S)``, and so do we).
  ``moe_norm_topk_prob=False`` drops the renormalisation (Hugging Face's
  ``norm_topk_prob=false``): ``softmax(l)_S`` over all ``E``, or ``sigmoid(l_S)``.

The output is Megatron's: ``probs`` ``[T, E]`` (zero off the selection) and ``routing_map``
``[T, E]`` bool. Everything else — z-loss, aux losses, token dropping, counting routed tokens —
is Megatron's own ``TopKRouter.routing``. Where we differ from Megatron's expert-bias mode:

* Megatron applies an expert bias only with sigmoid scores. For softmax weights the biased
  sigmoid selection is plugged into Megatron's top-k through its routing-replay hook
  (:class:`_BiasedSigmoidSelection`), so the rest of Megatron's routing runs unchanged.
* Megatron's sigmoid path selects with any ``expert_bias`` it finds; a bias that must not
  select is withheld from it for the duration of the routing call.
* unnormalised weights are Megatron's renormalised ones times the selected mass
  (``sum_S softmax(l)`` or ``sum_S sigmoid(l)``), so gradients are those of the unnormalised
  formula.
* the bias is updated by :func:`megatron_grove.moe.balancing.update_expert_bias` (paper or
  Megatron rule), not by Megatron's ``finalize_model_grads``: the config keeps
  ``moe_router_enable_expert_bias=False``.

Buffers: ``expert_bias`` ``[E]`` fp32, persistent (in ``state_dict`` / ``sharded_state_dict``
as ``<prefix>expert_bias``; absent when the rule is ``'none'``), and
``local_tokens_per_expert`` ``[E]`` fp32, not persistent: tokens routed to each expert by this
rank, summed over the forwards run with grad enabled since the last
:func:`~megatron_grove.moe.balancing.update_expert_bias` (which resets it).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from megatron_grove.megatron_config import GroveTransformerConfig

__all__ = ["GroveTopKRouter"]

# Megatron's top-k: (scores [T, E], k, num_groups, group_topk) -> (values [T, k], indices [T, k])
TopK = Callable[[torch.Tensor, int, Optional[int], Optional[int]],
                tuple[torch.Tensor, torch.Tensor]]


class _BiasedSigmoidSelection:
    """Megatron's top-k hook (the ``router_replay`` argument of
    ``topk_routing_with_score_function``) for softmax weights with a biased sigmoid selection.

    Megatron's softmax path calls ``get_replay_topk(logits, k, ...)`` and takes the softmax of
    the values it returns; we return the *logits* at the top-k of ``sigmoid(logits) + bias``.
    """

    layer_number: Optional[int] = None  # set by TopKRouter.set_layer_number

    def __init__(self, router: "GroveTopKRouter") -> None:
        self._router = router

    def get_replay_topk(self, logits: torch.Tensor, topk: int, num_groups: Optional[int],
                        group_topk: Optional[int], default_compute_topk: TopK
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``logits`` ``[T, E]`` -> (selected logits ``[T, k]``, expert indices ``[T, k]``)."""
        selection_scores = torch.sigmoid(logits.float()) + self._router.expert_bias
        _, indices = default_compute_topk(selection_scores, topk, num_groups, group_topk)
        return logits.gather(1, indices), indices


class GroveTopKRouter(TopKRouter):
    """Megatron's ``TopKRouter`` + the Grove expert bias (see the module docstring).

    ``forward(input [S, B, H], padding_mask=None) -> (probs [S*B, E], routing_map [S*B, E])``.
    """

    def __init__(self, config: GroveTransformerConfig,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 is_mtp_layer: bool = False) -> None:
        if pg_collection is None:  # as MoELayer does: Megatron's global groups
            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer)
        if config.moe_router_enable_expert_bias:
            raise ValueError("GroveTopKRouter keeps its own expert bias; set "
                             "moe_router_enable_expert_bias=False and choose moe_bias_update_rule")
        num_experts = config.num_moe_experts
        device = self.weight.device  # wherever Megatron put the router weight
        self.norm_topk_prob = config.moe_norm_topk_prob
        self._bias_in_selection = config.moe_expert_bias_in_selection
        # Megatron's switch for counting routed tokens into local_tokens_per_expert: we always
        # count (the trainer logs the load), whether or not a bias is kept.
        self.enable_expert_bias = True
        del self.local_tokens_per_expert, self.expert_bias  # plain None attributes upstream
        self.register_buffer("local_tokens_per_expert",
                             torch.zeros(num_experts, dtype=torch.float32, device=device),
                             persistent=False)
        if config.moe_bias_update_rule == "none":
            self.expert_bias = None
            return
        self.register_buffer("expert_bias",
                             torch.zeros(num_experts, dtype=torch.float32, device=device))
        if self.score_function == "softmax" and self._bias_in_selection:
            if self.router_replay is not None or config.moe_router_fusion:
                raise ValueError("moe_enable_routing_replay and moe_router_fusion cannot be "
                                 "combined with softmax routing and an expert bias (the biased "
                                 "selection uses Megatron's unfused top-k hook)")
            self.router_replay = _BiasedSigmoidSelection(self)

    @property
    def bias_selects(self) -> bool:
        """Whether an expert bias exists and takes part in selection (and is balanced)."""
        return self.expert_bias is not None and self._bias_in_selection

    @contextmanager
    def _bias_withheld(self) -> Iterator[None]:
        """Megatron's sigmoid routing adds any ``expert_bias`` to the selection scores: hide a
        bias that must not select while it runs."""
        if self.expert_bias is None or self._bias_in_selection:
            yield
            return
        bias = self._buffers["expert_bias"]
        self._buffers["expert_bias"] = None
        try:
            yield
        finally:
            self._buffers["expert_bias"] = bias

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Megatron's routing of ``logits`` ``[S, B, E]`` -> (probs, routing_map) ``[S*B, E]``,
        with the bias selecting only when it should and, for ``norm_topk_prob=False``, the
        weights scaled back to the unnormalised ones."""
        with self._bias_withheld():
            probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.norm_topk_prob or (self.score_function == "sigmoid" and self.topk == 1):
            return probs, routing_map
        flat = logits.reshape(-1, self.config.num_moe_experts).float()
        scores = (torch.softmax(flat, dim=-1) if self.score_function == "softmax"
                  else torch.sigmoid(flat))
        mass = (scores * routing_map).sum(dim=-1, keepdim=True)
        return (probs * mass).type_as(probs), routing_map

    def _maintain_float32_expert_bias(self) -> None:
        """Megatron keeps ``expert_bias`` fp32 under bf16 wrappers (called before forward, save
        and load); the token counts too, or bf16 would round them above 256."""
        super()._maintain_float32_expert_bias()
        if self.local_tokens_per_expert.dtype != torch.float32:
            self.local_tokens_per_expert.data = self.local_tokens_per_expert.data.float()
