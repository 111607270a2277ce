"""Carve one dense SwiGLU FFN into CMoE experts (docs/design.md, "CMoE").

``y = W_d (silu(W_g x) * (W_u x))`` with ``W_g, W_u`` ``[d_h, H]`` and ``W_d`` ``[H, d_h]``
becomes ``S`` shared experts (kept together as one FFN of ``S * m`` neurons) and ``N - S``
routed experts of ``m = ceil(d_h / N)`` neurons each. When ``N`` does not divide ``d_h``,
``N * m - d_h`` zero neurons (zero gate, up and down weights, so they add exactly nothing) are
appended first: no neuron of the dense FFN is dropped. Shared experts take the ``S * m``
neurons of highest activation rate; the rest are clustered into equal routed experts; the
router is fitted from the calibration data (:data:`ROUTERS`):

* ``linear`` (default): ``s = x W^T + c`` fitted in closed form (ridge regression) to each
  expert's true activation mass ``sum_{j in e} |h_j|`` on the calibration tokens
  (:func:`~megatron_grove.cmoe.router_init.linear_router`);
* ``paper``: CMoE's representative neuron per expert
  (:func:`~megatron_grove.cmoe.router_init.representative_neurons`).

Invariant: shared + every routed expert at weight 1 == the dense FFN, whatever the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_grove.cmoe.calibration import activation_markers, activation_rates, padded_hidden
from megatron_grove.cmoe.clustering import balanced_clusters
from megatron_grove.cmoe.router_init import (
    expert_activation_scores,
    linear_router,
    representative_neurons,
    router_rows,
)

__all__ = ["ROUTERS", "CarvedFFN", "carve_ffn", "pad_neurons"]

ROUTERS = ("linear", "paper")


@dataclass
class CarvedFFN:
    """One carved FFN. ``E = N - S`` routed experts of ``m`` neurons, hidden size ``H``.

    Router: ``linear`` has ``router_weight`` W and ``router_bias`` c (``router_up`` None);
    ``paper`` has the representative neurons' L2-normalised gate rows in ``router_weight`` and
    up rows in ``router_up`` (``router_bias`` None)."""

    shared_gate: torch.Tensor  # [S*m, H]
    shared_up: torch.Tensor  # [S*m, H]
    shared_down: torch.Tensor  # [H, S*m]
    expert_gate: torch.Tensor  # [E, m, H]
    expert_up: torch.Tensor  # [E, m, H]
    expert_down: torch.Tensor  # [E, H, m]
    router_weight: torch.Tensor  # [E, H]
    neuron_order: torch.Tensor  # [N*m]: padded-neuron index of each carved slot (shared first,
    #                             then expert 0's m neurons, ...); indices >= d_h are zero padding
    router_up: Optional[torch.Tensor] = None  # [E, H], paper router only
    router_bias: Optional[torch.Tensor] = None  # [E], linear router only

    @property
    def num_routed(self) -> int:
        return self.expert_gate.shape[0]

    @property
    def router(self) -> str:
        """``"paper"`` or ``"linear"`` (:data:`ROUTERS`)."""
        return "paper" if self.router_up is not None else "linear"


def pad_neurons(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor, total: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Append zero neurons up to ``total``: ``[d_h, H]``, ``[d_h, H]``, ``[H, d_h]`` ->
    ``[total, H]``, ``[total, H]``, ``[H, total]`` computing the same function."""
    extra = total - w_gate.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad {w_gate.shape[0]} neurons down to {total}")
    pad_rows = w_gate.new_zeros(extra, w_gate.shape[1])
    return (torch.cat([w_gate, pad_rows]), torch.cat([w_up, pad_rows]),
            torch.cat([w_down, w_down.new_zeros(w_down.shape[0], extra)], dim=1))


def _descending(values: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``values`` ``[n]`` descending, ties by ascending index."""
    return torch.sort(-values, stable=True).indices


@torch.no_grad()
def carve_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              calibration_inputs: torch.Tensor, num_shared: int, num_experts: int,
              activation_topk: int, router: str = "linear",
              hidden: Optional[torch.Tensor] = None) -> CarvedFFN:
    """Carve one FFN (deterministic: the same inputs give bitwise the same result).

    Args:
        w_gate, w_up: ``[d_h, H]``; w_down: ``[H, d_h]`` (fp32 recommended).
        calibration_inputs: ``[T, H]`` inputs of this FFN on calibration text.
        num_shared: S (>= 0); num_experts: N (> S), shared included.
        activation_topk: K_a, neurons each calibration token marks as active.
        router: one of :data:`ROUTERS`.
        hidden: ``[T, d_h]`` ``silu(x W_g^T) * (x W_u^T)`` if already computed (e.g. during
            the calibration forward); None computes it.
    """
    if not 0 <= num_shared < num_experts:
        raise ValueError(f"shared experts S={num_shared}: allowed 0..N-1={num_experts - 1}")
    if router not in ROUTERS:
        raise ValueError(f"router {router!r}: allowed {', '.join(ROUTERS)}")
    d_h = w_gate.shape[0]
    m = -(-d_h // num_experts)
    x = calibration_inputs.float()
    hidden = padded_hidden(x, w_gate.float(), w_up.float(), num_experts * m, hidden)
    w_gate, w_up, w_down = pad_neurons(w_gate.float(), w_up.float(), w_down.float(),
                                       num_experts * m)
    markers = activation_markers(hidden, min(activation_topk, d_h))
    order = _descending(activation_rates(markers))
    shared = order[:num_shared * m].sort().values
    routed = order[num_shared * m:].sort().values
    num_routed = num_experts - num_shared
    assignment = balanced_clusters(markers[:, routed], num_routed)
    members = torch.stack([routed[assignment == e] for e in range(num_routed)])  # [E, m]
    if router == "paper":
        reps = representative_neurons(markers[:, routed], assignment, num_routed,
                                      eligible=routed < d_h)
        router_weight, router_up = router_rows(w_gate, w_up, routed[reps])
        router_bias = None
    else:
        router_weight, router_bias = linear_router(x, expert_activation_scores(hidden, members))
        router_up = None
    return CarvedFFN(
        shared_gate=w_gate[shared], shared_up=w_up[shared], shared_down=w_down[:, shared],
        expert_gate=w_gate[members], expert_up=w_up[members],
        expert_down=w_down[:, members].permute(1, 0, 2).contiguous(),
        router_weight=router_weight, router_up=router_up, router_bias=router_bias,
        neuron_order=torch.cat([shared, members.flatten()]))
