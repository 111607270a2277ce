"""Model FLOPs of a training step, counted from what ran, and the throughput figures built on them.

Per token, per forward pass, counting a multiply-add as 2 FLOPs and only matrix products
(norms, activations, softmax, rotary embeddings and the loss are left out). With ``h`` the
hidden size, ``q = heads x head_dim`` and ``kv = kv_heads x head_dim``, ``s`` the sequence
length, ``V`` the padded vocabulary, for each layer ``l``:

==================  ===========================================================================
attention           ``2 h (q + 2 kv)`` (QKV projection) ``+ 2 q h`` (output projection)
                    ``+ 2 q (s + 1)`` (scores and values, causal: a token at position ``i``
                    attends to ``i + 1`` positions, ``(s + 1) / 2`` on average, ``4 q`` each)
dense MLP           ``6 h f`` (SwiGLU: gate, up, down), ``f = model.ffn_hidden_size``
router              ``2 h E`` (CMoE router: ``4 h E``, gate and up rows)
routed experts      ``6 h f_e x r_l``, ``r_l`` = (token, expert) rows computed per token
adjugates           ``6 h f_a x a_l``, ``a_l`` = (token, group) rows computed per token
shared expert       ``6 h f_s``
==================  ===========================================================================

plus the output layer, ``2 h V``. ``r_l`` and ``a_l`` are the Grove layers' counters of the step
(``routed_evals_per_token``, ``adjugate_evals_per_token``: what the experts really computed,
summed over the expert-parallel ranks); a Megatron ``MoELayer`` without counters computes
``r_l = k`` (dropless). A training step costs 3x the forward (the backward computes the
gradients of inputs and weights, 2x): ``model FLOPs per step = 3 x tokens x forward FLOPs per
token``. Activation recomputation is not counted (model FLOPs, not hardware FLOPs), nor the
weight gradients that ``train.trainable: router`` skips.

Achieved TFLOP/s per device = model FLOPs per step / step time / devices; MFU = that / the
device's peak (``logging.peak_tflops``, else the bf16 dense tensor-core peak of a known GPU;
none on CPU, where MFU is left out).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from megatron_grove.config import GroveConfig

__all__ = ["ForwardFlops", "forward_flops_per_token", "BF16_PEAK_TFLOPS", "peak_tflops",
           "throughput_record"]

# bf16 dense tensor-core peak per GPU (vendor datasheets, TFLOP/s; half the "with sparsity"
# figures), matched in this order against torch.cuda.get_device_name()
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0), ("B200", 2250.0), ("GH200", 989.4), ("H200", 989.4),
    ("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.4), ("H800", 989.4),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
)


@dataclass(frozen=True)
class ForwardFlops:
    """Forward FLOPs per token of the whole model, by part (see the module docstring)."""

    attention: float
    dense_mlp: float
    router: float
    routed_experts: float
    adjugates: float
    shared_experts: float
    output_layer: float

    @property
    def total(self) -> float:
        return sum(asdict(self).values())


def forward_flops_per_token(cfg: GroveConfig, padded_vocab_size: int,
                            routed_per_token: Optional[list[float]] = None,
                            adjugate_per_token: Optional[list[float]] = None) -> ForwardFlops:
    """Forward FLOPs per token of the configured model.

    Args:
        cfg: the run's config (shapes, MoE layers).
        padded_vocab_size: the output layer's vocabulary (Megatron's padded size).
        routed_per_token: (token, expert) rows computed per token, one value per MoE layer;
            None: ``moe.router_topk`` in each.
        adjugate_per_token: (token, group) rows computed per token per MoE layer; None: 0.
    """
    m, e = cfg.model, cfg.moe
    h, s = m.hidden_size, m.seq_length
    q, kv = m.num_attention_heads * m.head_dim, m.kv_heads * m.head_dim
    moe_layers = m.num_layers - e.first_k_dense_layers if e.num_experts else 0
    routed = routed_per_token if routed_per_token is not None else [e.router_topk] * moe_layers
    adjugate = adjugate_per_token if adjugate_per_token is not None else [0.0] * moe_layers
    if len(routed) != moe_layers or len(adjugate) != moe_layers:
        raise ValueError(f"expected one count per MoE layer ({moe_layers}), got "
                         f"{len(routed)} routed and {len(adjugate)} adjugate counts")
    router_rows = 2 if e.router_type == "cmoe" else 1  # paper CMoE: gate and up rows
    return ForwardFlops(
        attention=m.num_layers * (2 * h * (q + 2 * kv) + 2 * q * h + 2 * q * (s + 1)),
        dense_mlp=(m.num_layers - moe_layers) * 6 * h * m.ffn_hidden_size,
        router=moe_layers * 2 * h * e.num_experts * router_rows,
        routed_experts=6 * h * e.ffn_hidden_size * sum(routed),
        adjugates=6 * h * e.adjugate_ffn_hidden_size * sum(adjugate),
        shared_experts=moe_layers * 6 * h * (e.shared_expert_ffn_hidden_size or 0),
        output_layer=2 * h * padded_vocab_size,
    )


def peak_tflops(configured: Optional[float], device: torch.device) -> Optional[float]:
    """``logging.peak_tflops`` if set, else the bf16 dense peak of a known GPU, else None (CPU,
    or a GPU not in :data:`BF16_PEAK_TFLOPS`)."""
    if configured is not None:
        return configured
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in name), None)


def throughput_record(cfg: GroveConfig, padded_vocab_size: int, counters: dict[str, Any],
                      elapsed_s: float, world_size: int, peak: Optional[float]) -> dict[str, float]:
    """A step's throughput metrics: ``tokens_per_s`` (the global batch's tokens over the step
    time), ``tokens_per_s_per_device``, ``model_flops_per_token`` (forward + backward),
    ``tflops_per_device`` (achieved) and, when ``peak`` is known, ``mfu``. ``counters``: the
    step's :func:`megatron_grove.moe.counters.collect_moe_counters`."""
    tokens = cfg.train.global_batch_size * cfg.model.seq_length
    forward = forward_flops_per_token(cfg, padded_vocab_size,
                                      counters.get("routed_evals_per_token"),
                                      counters.get("adjugate_evals_per_token"))
    tflops = 3 * forward.total * tokens / elapsed_s / world_size / 1e12
    record = {"tokens_per_s": tokens / elapsed_s,
              "tokens_per_s_per_device": tokens / elapsed_s / world_size,
              "model_flops_per_token": 3 * forward.total, "tflops_per_device": tflops}
    if peak is not None:
        record["mfu"] = tflops / peak
    return record
