"""CMoE's training-free routers, computed from the dense weights and calibration data only.

* ``paper`` (CMoE): one representative neuron per routed expert, the member whose marker vector
  is closest (L1) to the cluster's mean marker vector; the router row of expert ``e`` is that
  neuron's gate and up rows, each L2-normalised, so that ``s_e = |silu(g_e x) * (u_e x)|``.
* ``linear`` (ours, the default): ``s = x W^T + c`` with ``W`` ``[E, H]``, ``c`` ``[E]``
  fitted by ridge regression, in closed form, to each expert's activation mass
  ``a_e = sum_{j in e} |h_j|`` on the calibration tokens (:func:`expert_activation_scores`),
  each token's targets centred over the experts (only the ranking within a token matters).
  Routing by ``a`` itself (the activation oracle) needs the whole FFN; the fit predicts it from
  ``x`` at ``E * H`` multiply-adds per token (docs/design.md, "The router").
"""

from __future__ import annotations

import torch

__all__ = ["representative_neurons", "router_rows", "expert_activation_scores",
           "linear_router"]

RIDGE_ALPHA = 1e-3  # ridge penalty, relative to the mean diagonal of the inputs' Gram matrix


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


def expert_activation_scores(hidden: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[T, d]`` FFN activations, ``members`` ``[E, m]`` neuron indices ->
    ``[T, E]`` activation mass ``sum_{j in e} |h_j|`` (the activation-routing oracle's scores)."""
    return hidden.abs()[:, members].sum(dim=-1)


def linear_router(x: torch.Tensor, targets: torch.Tensor, alpha: float = RIDGE_ALPHA
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge fit of ``targets`` ``[T, E]`` from the FFN inputs ``x`` ``[T, H]``.

    Targets are centred per token (over experts) and per expert (over tokens); with
    ``G = Xc^T Xc`` the centred inputs' Gram matrix, ``W = (G + alpha mean(diag G) I)^-1
    Xc^T Yc`` and ``c = mean(Y) - mean(x) W`` (means and the solve in float64, the two
    products over tokens in fp32). Returns ``(W [E, H], c [E])`` in fp32."""
    xs, ys = x.double(), targets.double()
    ys = ys - ys.mean(dim=1, keepdim=True)
    x_mean, y_mean = xs.mean(dim=0), ys.mean(dim=0)
    xc, yc = (xs - x_mean).float(), (ys - y_mean).float()
    gram, moment = (xc.T @ xc).double(), (xc.T @ yc).double()
    ridge = alpha * gram.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    weight = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype),
                                moment)  # [H, E]
    return weight.T.float().contiguous(), (y_mean - x_mean @ weight).float()
