"""Plain-torch forward of a carved FFN (the definition the Megatron layer is tested against).

For one token ``x`` ``[H]``: router logits ``l_e = w_e . x + c_e`` (linear router: rows
``w_e``, bias ``c_e``) or ``l_e = |silu(g_e . x) * (u_e . x)|`` (paper router: rows ``g_e``,
``u_e``), weights ``p = softmax(l)`` over the ``E`` routed experts; the selection is the
top-``k`` of ``p + b`` (balancing bias ``b``, selection only); the output is

    y = Shared(x) + sum_{e in selection} (1 + p_e * u_e) * Expert_e(x)

with learnable scales ``u`` (0 at carving).
"""

from __future__ import annotations

import torch

from megatron_grove.carving.cmoe import CarvedFFN
from megatron_grove.carving.neurons import ffn_hidden

__all__ = ["swiglu", "cmoe_router_probs", "carved_ffn_forward"]


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor
           ) -> torch.Tensor:
    """``x`` ``[T, H]`` -> ``(silu(x w_g^T) * (x w_u^T)) w_d^T`` ``[T, H]``."""
    return ffn_hidden(x, w_gate, w_up) @ w_down.T


def cmoe_router_probs(x: torch.Tensor, carved: CarvedFFN) -> torch.Tensor:
    """``x`` ``[T, H]`` -> ``softmax_e l_e`` ``[T, E]`` of ``carved``'s router."""
    if carved.router == "paper":
        logits = ffn_hidden(x, carved.router_weight, carved.router_up).abs()
    else:
        logits = x @ carved.router_weight.T + carved.router_bias
    return torch.softmax(logits, dim=-1)


def carved_ffn_forward(carved: CarvedFFN, x: torch.Tensor, topk: int,
                       scale: torch.Tensor | None = None, bias: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Token by token, expert by expert: ``x`` ``[T, H]`` -> ``[T, H]`` (see module docstring).
    ``scale`` = u ``[E]`` (default 0), ``bias`` = b ``[E]`` (default 0)."""
    num_routed = carved.num_routed
    scale = torch.zeros(num_routed) if scale is None else scale
    bias = torch.zeros(num_routed) if bias is None else bias
    probs = cmoe_router_probs(x, carved)
    out = swiglu(x, carved.shared_gate, carved.shared_up, carved.shared_down)
    rows = []
    for t in range(x.shape[0]):
        y = out[t]
        for e in (probs[t] + bias).topk(topk).indices.tolist():
            expert = swiglu(x[t:t + 1], carved.expert_gate[e], carved.expert_up[e],
                            carved.expert_down[e])[0]
            y = y + (1 + probs[t, e] * scale[e]) * expert
        rows.append(y)
    return torch.stack(rows)
