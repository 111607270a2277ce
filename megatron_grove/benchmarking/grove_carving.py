"""Grove carving vs CMoE carving of a dense model at (about) the same number of activated FFN
neurons per token: perplexity on held-out text and the neurons each carving really activates.

A CMoE carving SxAyEz activates ``(S + A) * m`` neurons per token (``m = ceil(d_ffn / N)``);
a Grove carving ``S*m + k*m_r + a * h``, ``h`` the adjugates evaluated per token and layer
(groups hit), read from the Grove layers' counters during the evaluation itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from megatron_grove.carving.grove import GroveCarveSpec

__all__ = ["parse_grove_spec", "measure_checkpoint", "carve_grove_and_measure",
           "cmoe_activated_neurons"]


def parse_grove_spec(name: str) -> GroveCarveSpec:
    """``"S3E8-G5n2a32k6"`` -> :class:`GroveCarveSpec` (shared 3 of 8 slots, 5 groups of 2
    experts, 32-neuron adjugates, top-6, linear router); a ``-paper`` suffix: the paper's
    router."""
    match = re.fullmatch(r"S(\d+)E(\d+)-G(\d+)n(\d+)a(\d+)k(\d+)(-paper)?", name)
    if match is None:
        raise ValueError(f"{name!r}: expected SxEy-GgNnAaKk[-paper], e.g. S3E8-G5n2a32k6")
    return GroveCarveSpec(*map(int, match.groups()[:6]),
                          router="paper" if match.group(7) else "linear")


def measure_checkpoint(checkpoint: str, tokens: torch.Tensor, seq_length: int) -> dict:
    """Perplexity of one of our checkpoints (CMoE or Grove carving, fine-tuned or not) and the
    FFN neurons it activates per token, averaged over layers and scored tokens:
    ``{"ppl", "tokens", "activated_neurons", "adjugate_evals_per_token"}``."""
    from megatron_grove.evaluation import perplexity
    from megatron_grove.checkpointing.model_io import load_megatron_model
    from megatron_grove.runtime import single_process_world

    with single_process_world():
        cfg, model = load_megatron_model(checkpoint)
        result = perplexity(model, tokens, seq_length, cfg.model.vocab_size, progress=False)
        layers = [m for m in model.modules() if isinstance(getattr(m, "grove_counters", None),
                                                             dict)]
        scored = result.windows * seq_length  # every input token of a window is routed
        adjugate = (sum(layer.grove_counters["adjugate_rows"] for layer in layers)
                    / (len(layers) * scored)) if layers else 0.0
    moe = cfg.moe
    activated = ((moe.shared_expert_ffn_hidden_size or 0) + moe.router_topk * moe.ffn_hidden_size
                 + (moe.adjugate_ffn_hidden_size * adjugate if moe.num_expert_groups else 0))
    return {"ppl": result.ppl, "tokens": result.tokens,
            "activated_neurons": round(activated, 1),
            "activated_share": round(activated / cfg.model.ffn_hidden_size, 4),
            "adjugate_evals_per_token": round(adjugate, 4)}


def carve_grove_and_measure(model: str, spec_name: str, out: Path, tokens: torch.Tensor,
                            seq_length: int, calibration_tokens: int | None = None) -> dict:
    """Carve ``model`` (HF folder or ``.gguf``) into Grove at ``spec_name`` under
    ``out/spec_name`` (kept if already there) and measure it (:func:`measure_checkpoint`), with
    the carving's timings. ``calibration_tokens``: None = the carving's default."""
    from megatron_grove.carving.pipeline import CarveJob, carve_model_to

    target = out / spec_name
    if not target.exists():
        extra = {} if calibration_tokens is None else {"calibration_tokens": calibration_tokens}
        carve_model_to(CarveJob(model=model, spec=parse_grove_spec(spec_name),
                                           output=str(target), progress=False, **extra))
    record = json.loads((target / "carve.json").read_text())
    return {"model": spec_name, **measure_checkpoint(str(target / "megatron"), tokens, seq_length),
            **{k: record[k] for k in ("calibration_tokens", "calibration_s", "clustering_s",
                                      "writing_s", "construction_s") if k in record}}


def cmoe_activated_neurons(spec_name: str, carving: Path) -> dict:
    """``{"activated_neurons": (S + A) * m}`` of the CMoE carving ``spec_name`` in ``carving``
    (its ``carve.json`` gives ``m``)."""
    from megatron_grove.benchmarking.cmoe import parse_spec

    spec = parse_spec(spec_name)
    m = json.loads((carving / "carve.json").read_text())["neurons_per_expert"]
    return {"activated_neurons": (spec.shared + spec.active) * m}
