"""A plain-torch reference of one Grove MoE layer, written from the formula (docs/design.md,
"Grove MoE") and nothing else: loops over tokens, their selected experts and the groups they hit.

    y = sum_{i in S} rho_i E_i(x) + lam * sum_{j: S hits G_j} (sum_{i in S ∩ G_j} rho_i) A_j(x)

Routing: logits l = W_r x; S = top-k of sigmoid(l) + b (of l when there is no bias or the bias
does not select); rho = softmax(l_S), or sigmoid(l_S) / sum sigmoid(l_S) (k = 1: sigmoid(l_S),
as Megatron); unnormalised (norm_topk_prob false): softmax(l)_S over all E, or sigmoid(l_S).
Experts are SwiGLU with Megatron's fc1 layout: rows [:F] gate, rows [F:] up.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["GroveWeights", "ReferenceOutput", "route", "swiglu", "grove_forward"]


@dataclass
class GroveWeights:
    """All weights of one layer (global, unsharded)."""

    router: torch.Tensor  # [E, H]
    expert_fc1: torch.Tensor  # [E, 2F, H]
    expert_fc2: torch.Tensor  # [E, H, F]
    adjugate_fc1: torch.Tensor  # [G, 2Fa, H]
    adjugate_fc2: torch.Tensor  # [G, H, Fa]

    @classmethod
    def random(cls, num_experts: int, num_groups: int, hidden: int, ffn: int, adjugate_ffn: int,
               seed: int, group_affinity: float = 0.0) -> "GroveWeights":
        """Random weights from ``seed``. ``group_affinity`` > 0 adds ``group_affinity * d_j`` to
        the router rows of group ``j`` (``d_j``: orthonormal directions, see
        :meth:`group_directions`), so tokens along ``d_j`` pick experts of group ``j``."""
        gen = torch.Generator().manual_seed(seed)
        E, G, H = num_experts, num_groups, hidden

        def randn(*shape: int, std: float) -> torch.Tensor:
            return torch.randn(*shape, generator=gen) * std

        router = randn(E, H, std=0.5)
        if group_affinity:
            router += group_affinity * cls.group_directions(G, H)[torch.arange(E) // (E // G)]
        return cls(router=router,
                   expert_fc1=randn(E, 2 * ffn, H, std=H ** -0.5),
                   expert_fc2=randn(E, H, ffn, std=ffn ** -0.5),
                   adjugate_fc1=randn(G, 2 * adjugate_ffn, H, std=H ** -0.5),
                   adjugate_fc2=randn(G, H, adjugate_ffn, std=adjugate_ffn ** -0.5))

    @staticmethod
    def group_directions(num_groups: int, hidden: int) -> torch.Tensor:
        """``[G, H]`` orthonormal rows (fixed, seed 0)."""
        gen = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(hidden, num_groups, generator=gen))
        return q.T.contiguous()

    def requires_grad_(self) -> "GroveWeights":
        for f in fields(self):
            getattr(self, f.name).requires_grad_(True)
        return self

    def grads(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name).grad for f in fields(self)}


@dataclass
class ReferenceOutput:
    y: torch.Tensor  # [T, H]
    routed_evaluations: int  # (token, expert) pairs
    adjugate_evaluations: int  # (token, group) pairs
    tokens_per_expert: torch.Tensor  # [E]


def swiglu(x: torch.Tensor, fc1: torch.Tensor, fc2: torch.Tensor) -> torch.Tensor:
    """``x`` [H], ``fc1`` [2F, H], ``fc2`` [H, F] -> [H]."""
    gate, up = (fc1 @ x).chunk(2)
    return fc2 @ (F.silu(gate) * up)


def route(logits: torch.Tensor, topk: int, score_function: str,
          expert_bias: Optional[torch.Tensor] = None, norm_topk_prob: bool = True,
          bias_in_selection: bool = True) -> list[tuple[int, torch.Tensor]]:
    """``logits`` [E] -> [(expert, weight)] for the selected experts."""
    biased = expert_bias is not None and bias_in_selection
    selection = torch.sigmoid(logits) + expert_bias if biased else logits
    chosen = torch.topk(selection.detach(), topk).indices.tolist()
    selected = logits[chosen]
    if score_function == "softmax":
        weights = (torch.softmax(selected, dim=0) if norm_topk_prob
                   else torch.softmax(logits, dim=0)[chosen])
    else:
        weights = torch.sigmoid(selected)
        if topk > 1 and norm_topk_prob:
            weights = weights / weights.sum()
    return list(zip(chosen, weights))


def grove_forward(x: torch.Tensor, w: GroveWeights, topk: int, num_groups: int,
                  adjugate_scale: float, score_function: str,
                  expert_bias: Optional[torch.Tensor] = None, norm_topk_prob: bool = True,
                  bias_in_selection: bool = True) -> ReferenceOutput:
    """``x`` [T, H] -> the Grove layer's output, token by token."""
    num_experts = w.router.shape[0]
    per_group = num_experts // num_groups
    rows, adjugate_evaluations = [], 0
    tokens_per_expert = torch.zeros(num_experts)
    for token in x:
        routing = route(w.router @ token, topk, score_function, expert_bias, norm_topk_prob,
                        bias_in_selection)
        y = torch.zeros_like(token)
        group_weight: dict[int, torch.Tensor] = {}
        for expert, rho in routing:
            y = y + rho * swiglu(token, w.expert_fc1[expert], w.expert_fc2[expert])
            group = expert // per_group
            group_weight[group] = group_weight.get(group, 0.0) + rho
            tokens_per_expert[expert] += 1
        for group, weight in group_weight.items():  # each adjugate once per (token, group)
            y = y + adjugate_scale * weight * swiglu(token, w.adjugate_fc1[group],
                                                     w.adjugate_fc2[group])
            adjugate_evaluations += 1
        rows.append(y)
    return ReferenceOutput(torch.stack(rows), x.shape[0] * topk, adjugate_evaluations,
                           tokens_per_expert)
