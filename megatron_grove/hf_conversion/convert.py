"""One checkpoint conversion, as the converter tool runs it: read (HF or Megatron), optionally
upcycle Qwen3-MoE to GroveMoE, write (HF in our or the released GroveMoE flavour, or Megatron
with the layout recorded), optionally verify the output against the source.

A Megatron checkpoint is a dist_checkpointing folder that loads at any TP/EP layout (Megatron
reshards on load); the target TP/EP sizes are checked against the model and recorded as the
checkpoint's parallel layout.

The release flavour (``hf_flavour="release"``) is refused, naming every difference, for a model
the released GroveMoE code cannot compute exactly (:func:`~.hf_config.release_incompatibilities`).
A non-zero expert bias that selects is one such difference; ``drop_expert_bias`` takes it out of
selection instead (the model then computes another function: how many expert selections change
on a sample text is reported first), keeping its values in the file (the released code never
reads them).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_grove.config import ConfigError, GroveConfig, validate_layout
from megatron_grove.hf_conversion.verify import LogitsComparison

__all__ = ["Conversion", "ConversionResult", "convert_checkpoint"]


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
    hf_flavour: str = "default"  # "default" | "release" (HF GroveMoE output)
    drop_expert_bias: bool = False  # release flavour: take a selecting bias out of selection
    verify: bool = False  # run source and target on sample tokens and compare their logits
    verify_tokens: int = 256


@dataclass
class ConversionResult:
    """What a conversion reports: ``lines`` to print (notes, then the summary) and, with
    ``verify``, the comparison of source and target logits."""

    lines: list[str] = field(default_factory=list)
    comparison: Optional[LogitsComparison] = None


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


def _bias_selects_nonzero(cfg: GroveConfig, state: dict[str, torch.Tensor]) -> bool:
    return cfg.moe.expert_bias_in_selection and any(
        bool(torch.count_nonzero(t)) for n, t in state.items() if n.endswith("expert_bias"))


def _release_flavour(job: Conversion, cfg: GroveConfig, state: dict[str, torch.Tensor],
                     tokenizer_dir: Optional[str], result: ConversionResult) -> Optional[dict]:
    """Check (and with ``drop_expert_bias`` adapt) ``cfg`` for the release flavour; returns the
    routing keys changed on purpose (for the verification's reference), or None."""
    from megatron_grove.hf_conversion.hf_config import HFFormatError, release_incompatibilities
    from megatron_grove.hf_conversion.runners import sample_tokens
    from megatron_grove.hf_conversion.verify import selection_changes

    selecting = _bias_selects_nonzero(cfg, state)
    problems = release_incompatibilities(cfg, selecting and not job.drop_expert_bias)
    if problems:
        raise HFFormatError("--hf-flavour release: the released GroveMoE code cannot compute this "
                            f"model exactly: {'; '.join(problems)}")
    if not selecting:
        return None
    tokens, what = sample_tokens(tokenizer_dir, cfg.model.vocab_size, job.verify_tokens)
    changed, total = selection_changes(cfg, state, tokens, expert_bias_in_selection=False)
    result.lines.append(f"--drop-expert-bias: {changed} of {total} expert selections "
                        f"({100 * changed / max(total, 1):.1f}%) change on {what}; the bias is "
                        "kept in the file but no longer selects")
    cfg.moe.expert_bias_in_selection = False
    return {"expert_bias_in_selection": False}


def convert_checkpoint(job: Conversion, progress: bool = True) -> ConversionResult:
    """Run the conversion in a private one-process world (see the module docstring)."""
    from tqdm import tqdm

    from megatron_grove.checkpointing import checkpoint_tokenizer
    from megatron_grove.checkpointing.model_io import save_megatron_checkpoint
    from megatron_grove.hf_conversion import (
        load_hf_checkpoint,
        load_megatron_state,
        save_hf_checkpoint,
        upcycle_to_grove,
    )
    from megatron_grove.runtime import single_process_world

    def bar(desc: str):
        return lambda it: tqdm(it, desc=desc, unit="tensor", disable=not progress)

    result = ConversionResult()
    with single_process_world(device="cpu"):
        if job.source_format == "hf":
            cfg, state = load_hf_checkpoint(job.input, bar("read hf"))
            tokenizer_dir = cfg.data.tokenizer
        else:
            cfg, state = load_megatron_state(job.input)
            tokenizer_dir = checkpoint_tokenizer(job.input)
        source_cfg = copy.deepcopy(cfg)
        if job.upcycle_grove:
            cfg, state = upcycle_to_grove(cfg, state, job.num_expert_groups,
                                          job.adjugate_ffn_hidden_size, job.adjugate_scale,
                                          seed=job.seed)
        changed_on_purpose = None
        if job.target_format == "hf" and job.hf_flavour == "release":
            changed_on_purpose = _release_flavour(job, cfg, state, tokenizer_dir, result)
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
                               progress=bar("write hf"), flavour=job.hf_flavour)
        kind = ("GroveMoE" if cfg.moe.num_expert_groups else "MoE" if cfg.moe.num_experts
                else "dense")
        result.lines.append(f"wrote {job.target_format} checkpoint {job.output}: {kind} model, "
                            f"{cfg.model.num_layers} layers, {len(state)} tensors, "
                            f"{cfg.runtime.dtype}")
        if job.verify:
            result.comparison = _verify(job, source_cfg, state, tokenizer_dir, changed_on_purpose,
                                        result)
    return result


def _verify(job: Conversion, source_cfg: GroveConfig, state: dict[str, torch.Tensor],
            tokenizer_dir: Optional[str], changed_on_purpose: Optional[dict],
            result: ConversionResult) -> LogitsComparison:
    """Source vs written target on sample tokens. When the routing was changed on purpose
    (``--drop-expert-bias``) the reference is the source with that change applied."""
    from megatron_grove.hf_conversion.runners import checkpoint_logits, model_logits, sample_tokens
    from megatron_grove.hf_conversion.verify import compare_logits

    tokens, what = sample_tokens(tokenizer_dir, source_cfg.model.vocab_size, job.verify_tokens)
    if changed_on_purpose:
        reference_cfg = copy.deepcopy(source_cfg)
        for key, value in changed_on_purpose.items():
            setattr(reference_cfg.moe, key, value)
        source = model_logits(reference_cfg, state)
        source_runner = "our model code, with " + ", ".join(
            f"moe.{k}={v}" for k, v in changed_on_purpose.items())
    else:
        source, source_runner = checkpoint_logits(job.input, job.source_format)
    target, target_runner = checkpoint_logits(job.output, job.target_format)
    comparison = compare_logits(source, target, tokens, source_cfg.model.seq_length)
    result.lines.append(f"verify: source ({source_runner}) vs target ({target_runner}) on "
                        f"{what}: {comparison.describe()}")
    return comparison
