"""Expert and group load over training steps, from a run's ``metrics.jsonl``, as PNG plots.

Per MoE layer: ``expert_load_layer{L}.png`` (heatmap: step x expert, share of the layer's
tokens) and, given the number of groups, ``group_load_layer{L}.png`` (groups of contiguous
experts, as in Grove MoE); plus ``imbalance.png``: max/mean expert load per layer over steps
(1.0 = perfectly balanced).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from megatron_grove.training.metrics import read_metrics

__all__ = ["load_matrix", "group_load", "imbalance", "plot_load"]


def load_matrix(records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """-> steps ``[S]`` and expert load ``[S, layers, E]`` from records holding ``expert_load``."""
    rows = [r for r in records if r.get("expert_load")]
    if not rows:
        raise ValueError("no record has a non-empty 'expert_load' (was this an MoE run?)")
    return (np.array([r["step"] for r in rows]),
            np.array([r["expert_load"] for r in rows], dtype=np.float64))


def group_load(load: np.ndarray, groups: int) -> np.ndarray:
    """``[S, layers, E]`` -> ``[S, layers, G]`` summing contiguous experts."""
    steps, layers, experts = load.shape
    if experts % groups:
        raise ValueError(f"--groups {groups} does not divide the {experts} experts")
    return load.reshape(steps, layers, groups, experts // groups).sum(-1)


def imbalance(load: np.ndarray) -> np.ndarray:
    """max/mean load per step and layer ``[S, layers]``."""
    mean = load.mean(-1)
    return np.divide(load.max(-1), mean, out=np.ones_like(mean), where=mean > 0)


def _heatmap(plt, steps, share, title, xlabel, path):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    image = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis",
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, share.shape[1] - 0.5))
    ax.set_xlabel("step")
    ax.set_ylabel(xlabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the layer's routed tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_load(metrics: Path, out: Path, groups: int | None) -> list[Path]:
    """PNGs of the expert (and, with ``groups``, group) load of the run whose ``metrics.jsonl``
    is ``metrics``, written into ``out``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, load = load_matrix(read_metrics(metrics))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for layer in range(load.shape[1]):
        per_layer = load[:, layer]
        share = per_layer / np.maximum(per_layer.sum(-1, keepdims=True), 1)
        path = out / f"expert_load_layer{layer}.png"
        _heatmap(plt, steps, share, f"MoE layer {layer}: expert load", "expert", path)
        written.append(path)
        if groups:
            g = group_load(load, groups)[:, layer]
            path = out / f"group_load_layer{layer}.png"
            _heatmap(plt, steps, g / np.maximum(g.sum(-1, keepdims=True), 1),
                     f"MoE layer {layer}: group load ({groups} groups)", "group", path)
            written.append(path)
    fig, ax = plt.subplots(figsize=(8, 4))
    for layer, curve in enumerate(imbalance(load).T):
        ax.plot(steps, curve, label=f"layer {layer}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title("Expert load imbalance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "imbalance.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]
