"""Carve one dense SwiGLU FFN into CMoE experts (docs/design.md, "CMoE").

``y = W_d (silu(W_g x) * (W_u x))`` with ``W_g, W_u`` ``[d_h, H]`` and ``W_d`` ``[H, d_h]``
becomes ``S`` shared experts (kept together as one FFN of ``S * m`` neurons) and ``N - S``
routed experts of ``m = ceil(d_h / N)`` neurons each. When ``N`` does not divide ``d_h``,
``N * m - d_h`` zero neurons (zero gate, up and down weights, so they add exactly nothing) are
appended first: no neuron of the dense FFN is dropped. Shared experts take the ``S * m``
neurons of highest activation rate; the rest are clustered into equal routed experts; each
routed expert gets a router row from its representative neuron.

Invariant: shared + every routed expert at weight 1 == the dense FFN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grove.cmoe.calibration import activation_markers, activation_rates, ffn_hidden
from megatron_grove.cmoe.clustering import balanced_clusters
from megatron_grove.cmoe.router_init import representative_neurons, router_rows

__all__ = ["CarvedFFN", "carve_ffn", "pad_neurons"]


@dataclass
class CarvedFFN:
    """One carved FFN. ``E = N - S`` routed experts of ``m`` neurons, hidden size ``H``."""

    shared_gate: torch.Tensor  # [S*m, H]
    shared_up: torch.Tensor  # [S*m, H]
    shared_down: torch.Tensor  # [H, S*m]
    expert_gate: torch.Tensor  # [E, m, H]
    expert_up: torch.Tensor  # [E, m, H]
    expert_down: torch.Tensor  # [E, H, m]
    router_gate: torch.Tensor  # [E, H], rows L2-normalised
    router_up: torch.Tensor  # [E, H], rows L2-normalised
    neuron_order: torch.Tensor  # [N*m]: padded-neuron index of each carved slot (shared first,
    #                             then expert 0's m neurons, ...); indices >= d_h are zero padding

    @property
    def num_routed(self) -> int:
        return self.expert_gate.shape[0]


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


@torch.no_grad()
def carve_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
              calibration_inputs: torch.Tensor, num_shared: int, num_experts: int,
              activation_topk: int) -> CarvedFFN:
    """Carve one FFN.

    Args:
        w_gate, w_up: ``[d_h, H]``; w_down: ``[H, d_h]`` (fp32 recommended).
        calibration_inputs: ``[T, H]`` inputs of this FFN on calibration text.
        num_shared: S (>= 0); num_experts: N (> S), shared included.
        activation_topk: K_a, neurons each calibration token marks as active.
    """
    if not 0 <= num_shared < num_experts:
        raise ValueError(f"shared experts S={num_shared}: allowed 0..N-1={num_experts - 1}")
    d_h = w_gate.shape[0]
    m = -(-d_h // num_experts)
    w_gate, w_up, w_down = pad_neurons(w_gate.float(), w_up.float(), w_down.float(),
                                       num_experts * m)
    markers = activation_markers(ffn_hidden(calibration_inputs.float(), w_gate, w_up),
                                 min(activation_topk, d_h))
    rates = activation_rates(markers)
    order = sorted(range(num_experts * m), key=lambda j: (-float(rates[j]), j))
    shared = torch.tensor(sorted(order[:num_shared * m]), dtype=torch.long)
    routed = torch.tensor(sorted(order[num_shared * m:]), dtype=torch.long)
    num_routed = num_experts - num_shared
    assignment = balanced_clusters(markers[:, routed], num_routed)
    reps = representative_neurons(markers[:, routed], assignment, num_routed,
                                  eligible=routed < d_h)
    router_gate, router_up = router_rows(w_gate, w_up, routed[reps])
    members = torch.stack([routed[assignment == e] for e in range(num_routed)])  # [E, m]
    return CarvedFFN(
        shared_gate=w_gate[shared], shared_up=w_up[shared], shared_down=w_down[:, shared],
        expert_gate=w_gate[members], expert_up=w_up[members],
        expert_down=w_down[:, members].permute(1, 0, 2).contiguous(),
        router_gate=router_gate, router_up=router_up,
        neuron_order=torch.cat([shared, members.flatten()]))
