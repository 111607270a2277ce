"""Balanced clustering of neurons by their activation markers (CMoE's routed-expert grouping).

Each neuron ``j`` is described by its binary marker vector over the calibration tokens (column
``j`` of the ``[T, n]`` markers). ``n = C * m`` neurons are split into ``C`` clusters of exactly
``m`` neurons: centroids start at the ``C`` most active neurons; each round assigns neurons to
centroids by a balanced linear assignment (every centroid replicated ``m`` times, L1 cost,
``scipy.optimize.linear_sum_assignment``), then moves each centroid to its cluster's mean;
rounds stop when the assignment no longer changes.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["balanced_assignment", "balanced_clusters"]


def balanced_assignment(cost: torch.Tensor, size: int) -> torch.Tensor:
    """Optimal balanced assignment.

    ``cost`` ``[n, C]`` (neuron -> centroid), ``n = C * size`` -> cluster of each neuron
    ``[n]`` (long), every cluster holding exactly ``size`` neurons, minimising the summed cost.
    """
    n, clusters = cost.shape
    if n != clusters * size:
        raise ValueError(f"{n} neurons cannot form {clusters} clusters of {size}")
    replicated = cost.repeat_interleave(size, dim=1).double().numpy()  # column c*size+r -> c
    rows, cols = linear_sum_assignment(replicated)
    assignment = np.empty(n, dtype=np.int64)
    assignment[rows] = cols // size
    return torch.from_numpy(assignment)


def balanced_clusters(markers: torch.Tensor, num_clusters: int,
                      max_rounds: int = 30) -> torch.Tensor:
    """``markers`` ``[T, n]`` (bool or 0/1) -> cluster of each neuron ``[n]`` (long), ``n / C``
    neurons per cluster; deterministic (ties broken by neuron index)."""
    points = markers.float().T.contiguous()  # [n, T]
    n = points.shape[0]
    if n % num_clusters:
        raise ValueError(f"{n} neurons do not split into {num_clusters} equal clusters")
    size = n // num_clusters
    rates = points.mean(dim=1)
    order = sorted(range(n), key=lambda j: (-float(rates[j]), j))
    centroids = points[order[:num_clusters]].clone()  # [C, T]
    assignment = None
    for _ in range(max_rounds):
        new = balanced_assignment(torch.cdist(points, centroids, p=1), size)
        if assignment is not None and torch.equal(new, assignment):
            break
        assignment = new
        centroids = torch.stack([points[assignment == c].mean(dim=0)
                                 for c in range(num_clusters)])
    return assignment
