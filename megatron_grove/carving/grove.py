"""The Grove carving method (docs/design.md, section 3.6): its shape :class:`GroveCarveSpec` and
the carving of one dense SwiGLU FFN into a Grove MoE layer (:func:`carve_grove_ffn`).

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

Megatron names under ``decoder.layers.{i}.mlp.``: the CMoE carving's (router, routed experts,
shared expert; :mod:`.weights`) plus, per group ``g``,
``adjugate_experts.local_experts.{g}.linear_fc1.weight`` ``[2a, H]`` (= [gate; up]) and
``.linear_fc2.weight`` ``[H, a]``; the run config routes with ``moe.router_type: cmoe_linear``
(or ``cmoe``) and ``moe.num_expert_groups: G``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_grove.carving.clustering import balanced_clusters
from megatron_grove.carving.cmoe import CarvedFFN, split_ffn
from megatron_grove.carving.neurons import (
    activation_markers,
    activation_rates,
    by_rate,
    pad_neurons,
    padded_hidden,
)
from megatron_grove.carving.router_fit import (
    expert_activation_scores,
    linear_router,
    representative_neurons,
    router_rows,
)
from megatron_grove.carving.spec import Router, check_slots, default_activation_topk, slot_neurons
from megatron_grove.carving.weights import carved_ffn_to_megatron
from megatron_grove.config import MoEConfig

__all__ = ["GroveCarveSpec", "CarvedGroveFFN", "carve_grove_ffn", "grove_selection_gain",
           "carved_grove_ffn_to_megatron"]


@dataclass(frozen=True)
class GroveCarveSpec:
    """``shared`` S of ``experts`` N CMoE-sized slots (m = ceil(d_ffn / N) neurons each) form the
    shared expert; the rest become ``groups`` G groups of ``per_group`` n routed experts plus one
    adjugate of ``adjugate`` a neurons; ``active`` k routed experts per token. A
    :class:`~.pipeline.CarvingMethod`."""

    shared: int
    experts: int
    groups: int
    per_group: int
    adjugate: int
    active: int
    activation_topk: int | None = None  # K_a; None = d_ffn // 10 (as CMoE)
    router: Router = Router.LINEAR

    def __post_init__(self) -> None:
        object.__setattr__(self, "router", Router(self.router))
        if self.groups < 1 or self.per_group < 1:
            raise ValueError(f"--groups {self.groups} --experts-per-group {self.per_group}: "
                             "both must be >= 1")
        if self.adjugate < 1:
            raise ValueError(f"--adjugate-size {self.adjugate}: must be >= 1")
        check_slots(self.shared, self.experts, self.active, self.routed,
                    "the routed experts, --groups x --experts-per-group")

    @property
    def routed(self) -> int:
        """E = G * n routed experts."""
        return self.groups * self.per_group

    @property
    def name(self) -> str:
        return (f"S{self.shared}E{self.experts}-G{self.groups}n{self.per_group}"
                f"a{self.adjugate}k{self.active}"
                + ("-paper" if self.router is Router.PAPER else ""))

    @property
    def adjugate_scale(self) -> float:
        """lam = G / E = 1 / n: all n experts of a group at weight 1 give its adjugate weight 1."""
        return 1.0 / self.per_group

    def active_neurons(self, d_ffn: int) -> int:
        """K_a: ``activation_topk``, by default ``d_ffn // 10`` (at least 1)."""
        return default_activation_topk(self.activation_topk, d_ffn)

    def shared_neurons(self, d_ffn: int) -> int:
        """S * ceil(d_ffn / N)."""
        return self.shared * slot_neurons(d_ffn, self.experts)

    def neurons_per_expert(self, d_ffn: int) -> int:
        """m_r = ceil((ceil(routed pool / G) - a) / n), the routed pool being (N - S) * m."""
        group = -(-(self.experts - self.shared) * slot_neurons(d_ffn, self.experts)
                  // self.groups)
        if group <= self.adjugate:
            raise ValueError(f"--adjugate-size {self.adjugate}: must be below the {group} "
                             "neurons of a group (the routed neurons / --groups)")
        return -(-(group - self.adjugate) // self.per_group)

    def padded_neurons(self, d_ffn: int) -> int:
        """``S*m + G*(a + n*m_r)`` >= d_ffn: the FFN's neurons plus zero padding."""
        return self.shared_neurons(d_ffn) + self.groups * (
            self.adjugate + self.per_group * self.neurons_per_expert(d_ffn))

    def describe(self, d_ffn: int) -> dict:
        """The shape's fields of the carving record (a bad ``adjugate`` fails here)."""
        return {"activation_topk": self.active_neurons(d_ffn),
                "shared_neurons": self.shared_neurons(d_ffn),
                "neurons_per_expert": self.neurons_per_expert(d_ffn),
                "adjugate_neurons": self.adjugate, "adjugate_scale": self.adjugate_scale}

    def carve_layer(self, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
                    inputs: torch.Tensor, hidden: torch.Tensor | None) -> CarvedGroveFFN:
        """One FFN (:func:`carve_grove_ffn`)."""
        return carve_grove_ffn(w_gate, w_up, w_down, inputs, self, hidden=hidden)

    def layer_to_megatron(self, carved: CarvedGroveFFN, prefix: str) -> dict[str, torch.Tensor]:
        return carved_grove_ffn_to_megatron(carved, prefix)

    def moe_config(self, d_ffn: int) -> MoEConfig:
        """The carved model's ``moe`` section: ``G`` groups of ``n`` routed experts of ``m_r``
        neurons and an adjugate of ``a``, the shared expert, a CMoE router."""
        return MoEConfig(num_experts=self.routed, router_topk=self.active,
                         ffn_hidden_size=self.neurons_per_expert(d_ffn),
                         router_type=self.router.router_type, num_expert_groups=self.groups,
                         adjugate_ffn_hidden_size=self.adjugate,
                         adjugate_scale=self.adjugate_scale,
                         shared_expert_ffn_hidden_size=self.shared_neurons(d_ffn) or None,
                         router_score_function="softmax", bias_update_rule="paper")

    def write_extras(self, folder: Path, hf_config: dict, hf_state: dict[str, torch.Tensor],
                     carved: list[CarvedGroveFFN], tokenizer_dir: Path) -> None:
        """Nothing: a Grove carving has no Hugging Face-style export."""


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
    ranked = by_rate(rates, torch.arange(padded))
    num_shared = spec.shared_neurons(d_h)
    shared = ranked[:num_shared].sort().values
    pool = ranked[num_shared:].sort().values
    groups = balanced_clusters(markers[:, pool], spec.groups)
    members, adjugates, reps = [], [], []
    for j in range(spec.groups):
        group = by_rate(rates, pool[groups == j])
        adjugates.append(group[:a].sort().values)
        rest = group[a:].sort().values
        experts = balanced_clusters(markers[:, rest], n)
        if spec.router is Router.PAPER:
            reps.append(rest[representative_neurons(markers[:, rest], experts, n,
                                                    eligible=rest < d_h)])
        members += [rest[experts == e] for e in range(n)]
    members = torch.stack(members)  # [E, m_r]
    adjugate = torch.stack(adjugates)  # [G, a]
    if spec.router is Router.PAPER:
        fitted = (*router_rows(w_gate, w_up, torch.cat(reps)), None)
    else:
        weight, bias = linear_router(x, grove_selection_gain(hidden, members, adjugate))
        fitted = (weight, None, bias)
    return CarvedGroveFFN(
        routed=split_ffn(w_gate, w_up, w_down, shared, members, fitted),
        adjugate_gate=w_gate[adjugate], adjugate_up=w_up[adjugate],
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


def carved_grove_ffn_to_megatron(carved: CarvedGroveFFN, prefix: str) -> dict[str, torch.Tensor]:
    """Megatron state-dict entries of one freshly carved Grove FFN under ``prefix`` (e.g.
    ``decoder.layers.3.mlp.``), EP=1 names (module docstring)."""
    out = carved_ffn_to_megatron(carved.routed, prefix)
    for g in range(carved.adjugate_gate.shape[0]):
        adjugate = f"{prefix}adjugate_experts.local_experts.{g}."
        out[adjugate + "linear_fc1.weight"] = torch.cat([carved.adjugate_gate[g],
                                                         carved.adjugate_up[g]])
        out[adjugate + "linear_fc2.weight"] = carved.adjugate_down[g].clone()
    return out

