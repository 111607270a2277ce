"""One checkpoint conversion, as the converter tool runs it: read (HF or Megatron), optionally
upcycle Qwen3-MoE to GroveMoE, write (HF or Megatron, with the layout recorded).

A Megatron checkpoint is a dist_checkpointing folder that loads at any TP/EP layout (Megatron
reshards on load); the target TP/EP sizes are checked against the model and recorded as the
checkpoint's parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_grove.config import ConfigError, GroveConfig, validate_layout

__all__ = ["Conversion", "convert_checkpoint"]


@dataclass
class Conversion:
    """What to convert (the converter tool's arguments)."""

    source_format: str  # "hf" | "megatron"
    target_format: str  # "hf" | "megatron"
    input: str
    output: str
    target_tp: int = 1
    target_ep: int = 1
    max_shard_size_mb: int = 5000
    upcycle_grove: bool = False
    num_expert_groups: Optional[int] = None
    adjugate_ffn_hidden_size: Optional[int] = None
    adjugate_scale: Optional[float] = None
    seed: int = 0


def _check_tp(cfg: GroveConfig, tp: int) -> None:
    m, e = cfg.model, cfg.moe
    sizes = {"model.num_attention_heads": m.num_attention_heads,
             "model.num_query_groups": m.kv_heads, "model.ffn_hidden_size": m.ffn_hidden_size}
    if e.num_experts:
        sizes["moe.ffn_hidden_size"] = e.ffn_hidden_size
    if e.num_expert_groups:
        sizes["moe.adjugate_ffn_hidden_size"] = e.adjugate_ffn_hidden_size
    for key, value in sizes.items():
        if value % tp:
            raise ConfigError(f"--target-tp {tp}: must divide {key}={value}")


def convert_checkpoint(job: Conversion, progress: bool = True) -> str:
    """Run the conversion in a private one-process world; return a one-line summary."""
    from tqdm import tqdm

    from megatron_grove.checkpointing import checkpoint_tokenizer
    from megatron_grove.hf_conversion import (
        load_hf_checkpoint,
        load_megatron_state,
        save_hf_checkpoint,
        save_megatron_checkpoint,
        upcycle_to_grove,
    )
    from megatron_grove.runtime import single_process_world

    def bar(desc: str):
        return lambda it: tqdm(it, desc=desc, unit="tensor", disable=not progress)

    with single_process_world(device="cpu"):
        if job.source_format == "hf":
            cfg, state = load_hf_checkpoint(job.input, bar("read hf"))
            tokenizer_dir = cfg.data.tokenizer
        else:
            cfg, state = load_megatron_state(job.input)
            tokenizer_dir = checkpoint_tokenizer(job.input)
        if job.upcycle_grove:
            cfg, state = upcycle_to_grove(cfg, state, job.num_expert_groups,
                                          job.adjugate_ffn_hidden_size, job.adjugate_scale,
                                          seed=job.seed)
        if job.target_format == "megatron":
            p = cfg.parallel
            p.tensor_model_parallel_size, p.expert_model_parallel_size = (job.target_tp,
                                                                          job.target_ep)
            p.sequence_parallel = job.target_tp > 1 and cfg.moe.num_experts > 0
            validate_layout(cfg, job.target_tp * job.target_ep)
            _check_tp(cfg, job.target_tp)
            cfg.data.tokenizer = tokenizer_dir
            save_megatron_checkpoint(job.output, cfg, state)
        else:
            save_hf_checkpoint(job.output, cfg, state, tokenizer_dir=tokenizer_dir,
                               max_shard_bytes=job.max_shard_size_mb * 2 ** 20,
                               progress=bar("write hf"))
    kind = ("GroveMoE" if cfg.moe.num_expert_groups else "MoE" if cfg.moe.num_experts
            else "dense")
    return (f"wrote {job.target_format} checkpoint {job.output}: {kind} model, "
            f"{cfg.model.num_layers} layers, {len(state)} tensors, {cfg.runtime.dtype}")
