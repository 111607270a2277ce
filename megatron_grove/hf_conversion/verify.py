"""Two models on the same tokens (logits functions of :mod:`.runners`, fp32).

* :func:`compare_logits` — the converter's ``--verify``: source and target logits on a few
  hundred tokens, reported as Megatron-Bridge's comparison reports them (cosine similarity,
  max absolute difference) plus top-5 agreement; :class:`LogitsComparison` says whether they
  agree.
* :func:`selection_changes` — how many expert selections a routing change moves (the
  converter's ``--drop-expert-bias``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from megatron_grove.checkpointing.model_io import build_model, load_state_into_model
from megatron_grove.config import GroveConfig
from megatron_grove.hf_conversion.runners import LogitsFn
from megatron_grove.model import gpt_logits
from megatron_grove.moe.router import GroveTopKRouter

__all__ = ["LogitsComparison", "compare_logits", "selection_changes"]

# Agreement thresholds of --verify (fp32 on both sides; a faithful conversion differs by float
# rounding, ~1e-6 of the logits' scale).
MIN_COSINE = 0.9999
MIN_TOP5 = 0.99
MAX_REL_DIFF = 1e-3


@dataclass
class LogitsComparison:
    """Source vs target logits over ``positions`` token positions: per-position cosine
    similarity (min and mean), max |difference|, the source logits' max |value| (``scale``),
    and top-5 agreement (mean share of each position's 5 most likely tokens the two share)."""

    positions: int
    cosine_min: float
    cosine_mean: float
    max_abs_diff: float
    scale: float
    top5_agreement: float

    def problems(self) -> list[str]:
        """What falls short of the thresholds (empty: the checkpoints agree)."""
        found = []
        if self.cosine_min < MIN_COSINE:
            found.append(f"min cosine {self.cosine_min:.6f} < {MIN_COSINE}")
        if self.top5_agreement < MIN_TOP5:
            found.append(f"top-5 agreement {self.top5_agreement:.4f} < {MIN_TOP5}")
        if self.max_abs_diff > MAX_REL_DIFF * max(1.0, self.scale):
            found.append(f"max |diff| {self.max_abs_diff:.3g} > {MAX_REL_DIFF:g} x max(1, max "
                         f"|logit| {self.scale:.3g})")
        return found

    def describe(self) -> str:
        return (f"logits over {self.positions} positions: cosine min {self.cosine_min:.8f} "
                f"mean {self.cosine_mean:.8f}, max |diff| {self.max_abs_diff:.3g} (max |logit| "
                f"{self.scale:.3g}), top-5 agreement {self.top5_agreement:.4f}")


def _windows(tokens: np.ndarray, seq_length: int) -> torch.Tensor:
    length = min(seq_length, len(tokens))
    count = len(tokens) // length
    return torch.as_tensor(tokens[:count * length], dtype=torch.int64).reshape(count, length)


@torch.no_grad()
def compare_logits(source: LogitsFn, target: LogitsFn, tokens: np.ndarray,
                   seq_length: int) -> LogitsComparison:
    """Run both on ``tokens`` (in windows of at most ``seq_length``) and compare."""
    cosines, top5, max_diff, scale, positions = [], [], 0.0, 0.0, 0
    for window in _windows(tokens, seq_length):
        a, b = source(window[None])[0], target(window[None])[0]
        if a.shape != b.shape:
            raise ValueError(f"source logits {tuple(a.shape)} and target logits "
                             f"{tuple(b.shape)} differ in shape")
        cosines.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
        top_a, top_b = a.topk(5, dim=-1).indices, b.topk(5, dim=-1).indices
        top5.append((top_a[:, :, None] == top_b[:, None, :]).any(-1).float().mean(-1))
        max_diff = max(max_diff, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
        positions += a.shape[0]
    cosine = torch.cat(cosines)
    return LogitsComparison(positions=positions, cosine_min=float(cosine.min()),
                            cosine_mean=float(cosine.mean()), max_abs_diff=max_diff, scale=scale,
                            top5_agreement=float(torch.cat(top5).mean()))


@torch.no_grad()
def _routing_maps(cfg: GroveConfig, state: Mapping[str, torch.Tensor],
                  windows: torch.Tensor) -> torch.Tensor:
    """Every MoE layer's routing map on ``windows``: ``[layers, tokens, E]`` bool."""
    model = build_model(cfg, dtype=torch.float32)
    load_state_into_model(model, cfg, state)
    model.eval()
    maps: dict[str, list[torch.Tensor]] = {}
    for name, module in model.named_modules():
        if isinstance(module, GroveTopKRouter):
            module.register_forward_hook(
                lambda m, i, out, name=name: maps.setdefault(name, []).append(out[1]))
    for window in windows:
        gpt_logits(model, window[None], cfg.model.vocab_size)
    return torch.stack([torch.cat(maps[name]) for name in sorted(maps)])


def selection_changes(cfg: GroveConfig, state: Mapping[str, torch.Tensor], tokens: np.ndarray,
                      **routing: object) -> tuple[int, int]:
    """(expert selections that change, all expert selections) over every MoE layer and token
    of ``tokens`` when the ``moe`` keys in ``routing`` (e.g. ``expert_bias_in_selection=False``)
    replace ``cfg``'s."""
    changed_cfg = copy.deepcopy(cfg)
    for key, value in routing.items():
        setattr(changed_cfg.moe, key, value)
    windows = _windows(tokens, cfg.model.seq_length)
    before = _routing_maps(cfg, state, windows)
    after = _routing_maps(changed_cfg, state, windows)
    return int((before & ~after).sum()), int(before.sum())
