"""The steps every carving method takes on one SwiGLU FFN's neurons: hidden activations,
activation markers and rates, ordering by rate, zero-neuron padding.

For calibration inputs ``x`` ``[T, H]`` (the FFN's inputs, i.e. after the pre-FFN norm) and
the FFN's ``w_gate``, ``w_up`` ``[d_h, H]``:

* ``h = silu(x w_gate^T) * (x w_up^T)`` ``[T, d_h]``;
* each token marks its ``K_a`` neurons of largest ``|h|`` (binary markers ``[T, d_h]``);
* the activation rate of neuron ``j`` is the share of tokens that mark it (``[d_h]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ffn_hidden", "padded_hidden", "pad_neurons", "activation_markers", "activation_rates",
           "by_rate"]


def ffn_hidden(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, H]``, ``w_gate``/``w_up`` ``[d_h, H]`` -> ``silu(x w_g^T) * (x w_u^T)`` ``[T, d_h]``."""
    return F.silu(x @ w_gate.T) * (x @ w_up.T)


def padded_hidden(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, total: int,
                  hidden: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``ffn_hidden`` ``[T, d_h]`` (``hidden`` if already computed) with zero columns
    appended up to ``[T, total]``: the hidden activations of the FFN padded by zero neurons.

    Always computed from the unpadded weights, so that passing ``hidden`` in and leaving it to
    this function are the same operations (a matmul over more rows may round differently).
    """
    hidden = (ffn_hidden(x, w_gate, w_up) if hidden is None else hidden).float()
    return torch.cat([hidden, hidden.new_zeros(hidden.shape[0], total - hidden.shape[1])], 1)


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


def activation_markers(hidden: torch.Tensor, k_a: int) -> torch.Tensor:
    """``hidden`` ``[T, d_h]`` -> bool ``[T, d_h]``, True at each token's ``k_a`` neurons of
    largest ``|h|``."""
    if not 1 <= k_a <= hidden.shape[1]:
        raise ValueError(f"activation top-k K_a={k_a}: allowed 1..{hidden.shape[1]} (d_ffn)")
    index = hidden.abs().topk(k_a, dim=1).indices
    return torch.zeros_like(hidden, dtype=torch.bool).scatter_(1, index, True)


def activation_rates(markers: torch.Tensor) -> torch.Tensor:
    """Bool markers ``[T, d_h]`` -> fp32 activation rates ``[d_h]`` (share of tokens marking each)."""
    return markers.float().mean(dim=0)


def by_rate(rates: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
    """``neurons`` ``[n]`` (ascending indices) ordered by decreasing activation rate
    (``rates`` ``[d_h]``), ties by index."""
    return neurons[torch.sort(-rates[neurons], stable=True).indices]
