"""CMoE's training-free router: one representative neuron per routed expert.

The representative of a cluster is its neuron whose marker vector is closest (L1) to the
cluster's mean marker vector. The router row of expert ``e`` is that neuron's gate and up rows,
each L2-normalised, so that the router score is ``s_e = |silu(w_g x) * (w_u x)|``.
"""

from __future__ import annotations

import torch

__all__ = ["representative_neurons", "router_rows"]


def representative_neurons(markers: torch.Tensor, assignment: torch.Tensor, num_clusters: int,
                           eligible: torch.Tensor | None = None) -> torch.Tensor:
    """``markers`` ``[T, n]``, ``assignment`` ``[n]`` -> representative neuron index of each
    cluster ``[C]`` (long): the eligible member closest in L1 to the cluster's mean marker
    vector (lowest index on ties). ``eligible`` ``[n]`` bool (default all) excludes e.g.
    zero-padded neurons; a cluster without an eligible member falls back to all its members."""
    points = markers.float().T  # [n, T]
    eligible = torch.ones(points.shape[0], dtype=torch.bool) if eligible is None else eligible
    reps = []
    for c in range(num_clusters):
        members = (assignment == c).nonzero().flatten()
        candidates = members[eligible[members]] if eligible[members].any() else members
        mean = points[members].mean(dim=0)
        distance = (points[candidates] - mean).abs().sum(dim=1)
        reps.append(candidates[int(torch.argmin(distance))])
    return torch.stack(reps)


def router_rows(w_gate: torch.Tensor, w_up: torch.Tensor, neurons: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate and up rows ``[C, H]`` of ``neurons`` ``[C]``, each row L2-normalised (a zero row
    stays zero)."""
    def normalise(rows: torch.Tensor) -> torch.Tensor:
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)

    return normalise(w_gate[neurons]), normalise(w_up[neurons])
