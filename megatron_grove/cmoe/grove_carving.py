"""Carve one dense SwiGLU FFN into a Grove MoE layer (docs/design.md, section 3.6).

``y = W_d (silu(W_g x) * (W_u x))`` (``W_g, W_u`` ``[d_h, H]``, ``W_d`` ``[H, d_h]``) becomes:

* a **shared expert** of the ``S*m`` neurons of highest activation rate (``m = ceil(d_h / N)``,
  exactly as CMoE's ``S`` shared experts);
* ``G`` **groups**: the remaining neurons clustered into ``G`` equal groups by their activation
  markers (CMoE's balanced clustering with ``G`` clusters);
* in each group, an **adjugate expert** ``A_j`` of the group's ``a`` neurons of highest
  activation rate (the neurons most of the group's tokens use), and ``n`` **routed experts** of
  ``m_r`` neurons each: the group's other neurons, clustered again into ``n`` equal experts.

Zero neurons pad ``d_h`` up to ``S*m + G*(a + n*m_r)`` (``m_r = ceil((ceil((N-S)*m / G) - a) /
n)``): no neuron is dropped, every neuron lands in exactly one place. Routed expert ``e`` of
group ``j`` is global expert ``j*n + e`` (the Grove layer's contiguous groups).

Our Grove layer computes ``Shared(x) + sum_{i in S} rho_i E_i(x) + lam * sum_{j hit}
(sum_{i in S ∩ G_j} rho_i) A_j(x)``. The carving sets ``lam = G/E = 1/n`` (the paper's bound)
and keeps the adjugate's down projection unscaled, and the CMoE router weighs a selected expert
by exactly 1 at carving. The router is the CMoE carving's (``linear`` by default: a ridge fit
of what selecting each expert adds, :func:`grove_selection_gain`; ``paper``: representative
neurons). **Invariant**: with every routed expert selected, each group's
adjugate gets weight ``lam * n = 1``, so the layer is the dense FFN. With ``k_j`` of group
``j``'s experts selected, the adjugate neurons contribute ``k_j / n`` of their dense value.

Activated FFN neurons per token: ``S*m + k*m_r + a * (groups hit)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_grove.cmoe.calibration import activation_markers, activation_rates, padded_hidden
from megatron_grove.cmoe.carve import ROUTERS, CarvedFFN, pad_neurons
from megatron_grove.cmoe.clustering import balanced_clusters
from megatron_grove.cmoe.router_init import (
    expert_activation_scores,
    linear_router,
    representative_neurons,
    router_rows,
)

__all__ = ["GroveCarveSpec", "CarvedGroveFFN", "carve_grove_ffn", "grove_selection_gain"]


@dataclass(frozen=True)
class GroveCarveSpec:
    """``shared`` S of ``experts`` N CMoE-sized slots (m = ceil(d_ffn / N) neurons each) form the
    shared expert; the rest become ``groups`` G groups of ``per_group`` n routed experts plus one
    adjugate of ``adjugate`` a neurons; ``active`` k routed experts per token."""

    shared: int
    experts: int
    groups: int
    per_group: int
    adjugate: int
    active: int
    activation_topk: int | None = None  # K_a; None = d_ffn // 10 (as CMoE)
    router: str = "linear"  # one of megatron_grove.cmoe.carve.ROUTERS

    def __post_init__(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"--router {self.router}: allowed {', '.join(ROUTERS)}")
        if not 0 <= self.shared < self.experts:
            raise ValueError(f"--shared {self.shared}: allowed 0..{self.experts - 1} "
                             f"(fewer than --experts {self.experts})")
        if self.groups < 1 or self.per_group < 1:
            raise ValueError(f"--groups {self.groups} --experts-per-group {self.per_group}: "
                             "both must be >= 1")
        if self.adjugate < 1:
            raise ValueError(f"--adjugate-size {self.adjugate}: must be >= 1")
        if not 1 <= self.active <= self.routed:
            raise ValueError(f"--active {self.active}: allowed 1..{self.routed} (the routed "
                             "experts, --groups x --experts-per-group)")

    @property
    def routed(self) -> int:
        """E = G * n routed experts."""
        return self.groups * self.per_group

    @property
    def name(self) -> str:
        return (f"S{self.shared}E{self.experts}-G{self.groups}n{self.per_group}"
                f"a{self.adjugate}k{self.active}" + ("-paper" if self.router == "paper" else ""))

    @property
    def router_type(self) -> str:
        """``moe.router_type`` of the carved model: ``cmoe_linear`` or ``cmoe`` (paper)."""
        return "cmoe" if self.router == "paper" else "cmoe_linear"

    @property
    def adjugate_scale(self) -> float:
        """lam = G / E = 1 / n: all n experts of a group at weight 1 give its adjugate weight 1."""
        return 1.0 / self.per_group

    def active_neurons(self, d_ffn: int) -> int:
        """K_a: ``activation_topk``, by default ``d_ffn // 10`` (at least 1)."""
        return self.activation_topk or max(1, d_ffn // 10)

    def shared_neurons(self, d_ffn: int) -> int:
        """S * ceil(d_ffn / N)."""
        return self.shared * -(-d_ffn // self.experts)

    def neurons_per_expert(self, d_ffn: int) -> int:
        """m_r = ceil((ceil(routed pool / G) - a) / n), the routed pool being (N - S) * m."""
        group = -(-(self.experts - self.shared) * -(-d_ffn // self.experts) // self.groups)
        if group <= self.adjugate:
            raise ValueError(f"--adjugate-size {self.adjugate}: must be below the {group} "
                             "neurons of a group (the routed neurons / --groups)")
        return -(-(group - self.adjugate) // self.per_group)

    def padded_neurons(self, d_ffn: int) -> int:
        """``S*m + G*(a + n*m_r)`` >= d_ffn: the FFN's neurons plus zero padding."""
        return self.shared_neurons(d_ffn) + self.groups * (
            self.adjugate + self.per_group * self.neurons_per_expert(d_ffn))


@dataclass
class CarvedGroveFFN:
    """One FFN carved into a Grove layer: ``routed`` holds the shared expert, the ``E = G*n``
    routed experts (group-major) and their router, as a CMoE carving; the adjugates:"""

    routed: CarvedFFN
    adjugate_gate: torch.Tensor  # [G, a, H]
    adjugate_up: torch.Tensor  # [G, a, H]
    adjugate_down: torch.Tensor  # [G, H, a]
    adjugate_scale: float  # lam = 1 / n
    adjugate_neurons: torch.Tensor  # [G, a]: padded-neuron index of each adjugate neuron


def _by_rate(rates: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """``neurons`` ``[n]`` ordered by decreasing activation rate, ties by index."""
    order = sorted(range(neurons.numel()), key=lambda i: (-float(rates[neurons[i]]),
                                                          int(neurons[i])))
    return neurons[torch.tensor(order, dtype=torch.long)]


@torch.no_grad()
def carve_grove_ffn(w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                    calibration_inputs: torch.Tensor, spec: GroveCarveSpec,
                    hidden: torch.Tensor | None = None) -> CarvedGroveFFN:
    """Carve one FFN (module docstring; deterministic). ``w_gate``, ``w_up`` ``[d_h, H]``,
    ``w_down`` ``[H, d_h]``; ``calibration_inputs`` ``[T, H]`` (this FFN's inputs on
    calibration text); ``hidden`` ``[T, d_h]`` their ``silu(x W_g^T) * (x W_u^T)`` if already
    computed (the calibration forward), None computes it."""
    d_h = w_gate.shape[0]
    n, a = spec.per_group, spec.adjugate
    x = calibration_inputs.float()
    padded = spec.padded_neurons(d_h)
    hidden = padded_hidden(x, w_gate.float(), w_up.float(), padded, hidden)
    w_gate, w_up, w_down = pad_neurons(w_gate.float(), w_up.float(), w_down.float(), padded)
    markers = activation_markers(hidden, min(spec.active_neurons(d_h), d_h))
    rates = activation_rates(markers)
    ranked = _by_rate(rates, torch.arange(padded))
    num_shared = spec.shared_neurons(d_h)
    shared = ranked[:num_shared].sort().values
    pool = ranked[num_shared:].sort().values
    groups = balanced_clusters(markers[:, pool], spec.groups)
    members, adjugates, reps = [], [], []
    for j in range(spec.groups):
        group = _by_rate(rates, pool[groups == j])
        adjugates.append(group[:a].sort().values)
        rest = group[a:].sort().values
        experts = balanced_clusters(markers[:, rest], n)
        if spec.router == "paper":
            reps.append(rest[representative_neurons(markers[:, rest], experts, n,
                                                    eligible=rest < d_h)])
        members += [rest[experts == e] for e in range(n)]
    members = torch.stack(members)  # [E, m_r]
    adjugate = torch.stack(adjugates)  # [G, a]
    if spec.router == "paper":
        router_weight, router_up = router_rows(w_gate, w_up, torch.cat(reps))
        router_bias = None
    else:
        router_weight, router_bias = linear_router(x, grove_selection_gain(hidden, members,
                                                                          adjugate))
        router_up = None
    routed = CarvedFFN(
        shared_gate=w_gate[shared], shared_up=w_up[shared], shared_down=w_down[:, shared],
        expert_gate=w_gate[members], expert_up=w_up[members],
        expert_down=w_down[:, members].permute(1, 0, 2).contiguous(),
        router_weight=router_weight, router_up=router_up, router_bias=router_bias,
        neuron_order=torch.cat([shared, members.flatten()]))
    return CarvedGroveFFN(
        routed=routed, adjugate_gate=w_gate[adjugate], adjugate_up=w_up[adjugate],
        adjugate_down=w_down[:, adjugate].permute(1, 0, 2).contiguous(),
        adjugate_scale=spec.adjugate_scale, adjugate_neurons=adjugate)


def grove_selection_gain(hidden: torch.Tensor, members: torch.Tensor, adjugates: torch.Tensor
                         ) -> torch.Tensor:
    """The linear router's targets ``[T, E]``: what selecting routed expert ``e`` adds to a
    token, in activation mass: its own ``sum_{j in e} |h_j|`` plus ``1/n`` of its group's
    adjugate mass (each selected expert of a group raises the adjugate's weight by
    ``lam = 1/n``). ``hidden`` ``[T, d]``, ``members`` ``[E, m_r]`` (group-major), ``adjugates``
    ``[G, a]``."""
    per_group = members.shape[0] // adjugates.shape[0]
    adjugate_mass = expert_activation_scores(hidden, adjugates)  # [T, G]
    return (expert_activation_scores(hidden, members)
            + adjugate_mass.repeat_interleave(per_group, dim=1) / per_group)
