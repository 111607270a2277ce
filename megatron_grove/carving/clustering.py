"""Balanced clustering of neurons by their activation markers (CMoE's routed-expert grouping).

Each neuron ``j`` is described by its binary marker vector over the calibration tokens (column
``j`` of the ``[T, n]`` markers). ``n = C * m`` neurons are split into ``C`` clusters of exactly
``m`` neurons: centroids start at the ``C`` most active neurons; each round assigns neurons to
centroids by an optimal balanced assignment (L1 cost, :func:`balanced_assignment`), then moves
each centroid to its cluster's mean; rounds stop when the assignment no longer changes.

The balanced assignment is a transportation problem (``n`` neurons, ``C`` clusters of capacity
``m``). It is solved exactly by negative-cycle cancelling on the ``C``-node cluster graph: the
edge ``p -> q`` costs the cheapest move of one neuron of ``p`` to ``q``, ``min_{i in p} cost[i,
q] - cost[i, p]``; moving one neuron along every edge of a cycle keeps every cluster's size,
and an assignment is optimal exactly when no cycle has negative cost (min-cost-flow optimality).
Starting from the previous round's assignment (or a greedy one) only a few cycles are
cancelled per round, far cheaper than a Hungarian solve of the ``n x n`` replicated cost.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["balanced_assignment", "balanced_clusters"]


def _greedy(cost: np.ndarray, size: int) -> np.ndarray:
    """A feasible balanced assignment: neurons by decreasing regret (second-cheapest minus
    cheapest cost) take their cheapest cluster with room left."""
    n, clusters = cost.shape
    prefs = np.argsort(cost, axis=1, kind="stable")
    ranked = np.take_along_axis(cost, prefs, axis=1)
    regret = ranked[:, 1] - ranked[:, 0] if clusters > 1 else np.zeros(n)
    room = np.full(clusters, size)
    out = np.empty(n, dtype=np.int64)
    for i in np.lexsort((np.arange(n), -regret)):
        c = next(c for c in prefs[i] if room[c])
        room[c] -= 1
        out[i] = c
    return out


def _negative_cycle(weight: np.ndarray, tol: float) -> list[int] | None:
    """A cycle of total weight below ``-tol`` in the complete digraph ``weight`` ``[C, C]``
    (Bellman-Ford from a virtual source; every cycle of the predecessor graph is negative), or
    None when there is none."""
    clusters = weight.shape[0]
    dist = np.zeros(clusters)
    pred = np.full(clusters, -1)
    for _ in range(clusters + 1):
        through = dist[:, None] + weight  # [p, q]: reach q via p
        best = through.argmin(axis=0)
        candidate = through[best, np.arange(clusters)]
        improved = candidate < dist - tol
        if not improved.any():
            return None
        dist = np.where(improved, candidate, dist)
        pred = np.where(improved, best, pred)
    node = int(np.flatnonzero(improved)[0])
    for _ in range(clusters):  # walk back into the cycle
        node = int(pred[node])
    cycle = [node]
    while (node := int(pred[node])) != cycle[0]:
        cycle.append(node)
    return cycle[::-1]  # edges cycle[k] -> cycle[k + 1]


def balanced_assignment(cost: torch.Tensor, size: int, init: torch.Tensor | None = None,
                        tol: float = 1e-9) -> torch.Tensor:
    """Optimal balanced assignment.

    ``cost`` ``[n, C]`` (neuron -> centroid), ``n = C * size`` -> cluster of each neuron
    ``[n]`` (long), every cluster holding exactly ``size`` neurons, minimising the summed cost
    (to ``tol`` relative to the largest cost). ``init`` ``[n]``: a balanced starting
    assignment (e.g. the previous round's); default greedy. Deterministic.
    """
    n, clusters = cost.shape
    if n != clusters * size:
        raise ValueError(f"{n} neurons cannot form {clusters} clusters of {size}")
    c = cost.double().numpy()
    a = _greedy(c, size) if init is None else init.numpy().astype(np.int64).copy()
    if not np.array_equal(np.bincount(a, minlength=clusters), np.full(clusters, size)):
        raise ValueError(f"init is not balanced ({size} neurons per cluster)")
    rows, columns = np.arange(n), np.arange(clusters)
    tol = tol * max(1.0, float(np.abs(c).max()))
    while True:
        delta = c - c[rows, a][:, None]  # [n, C]: cost change of moving neuron i to q
        weight, mover = np.empty((clusters, clusters)), np.empty((clusters, clusters), np.int64)
        for p in range(clusters):
            members = np.flatnonzero(a == p)
            best = delta[members].argmin(axis=0)
            weight[p], mover[p] = delta[members[best], columns], members[best]
        np.fill_diagonal(weight, 0.0)
        cycle = _negative_cycle(weight, tol)
        if cycle is None:
            return torch.from_numpy(a)
        for p, q in zip(cycle, cycle[1:] + cycle[:1]):
            a[mover[p, q]] = q


def balanced_clusters(markers: torch.Tensor, num_clusters: int,
                      max_rounds: int = 30) -> torch.Tensor:
    """``markers`` ``[T, n]`` (bool or 0/1) -> cluster of each neuron ``[n]`` (long), ``n / C``
    neurons per cluster; deterministic (ties broken by neuron index)."""
    points = markers.float().T.contiguous()  # [n, T], 0/1
    n = points.shape[0]
    if n % num_clusters:
        raise ValueError(f"{n} neurons do not split into {num_clusters} equal clusters")
    size = n // num_clusters
    order = torch.sort(-points.mean(dim=1), stable=True).indices
    centroids = points[order[:num_clusters]].clone()  # [C, T]
    assignment = None
    for _ in range(max_rounds):
        # L1 distance of 0/1 points to centroids in [0, 1]: sum(c) + p . (1 - 2c)
        cost = centroids.sum(dim=1)[None, :] + points @ (1 - 2 * centroids).T
        new = balanced_assignment(cost, size, init=assignment)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        onehot = torch.nn.functional.one_hot(assignment, num_clusters).to(points.dtype)
        centroids = (onehot.T @ points) / size
    return assignment
