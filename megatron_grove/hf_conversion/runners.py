"""Running a checkpoint: its logits function, where its consumers would run it.

A Hugging Face folder runs with ``transformers`` when ``transformers`` can run it
(:func:`load_transformers_model`: stock Llama / Qwen3 / Qwen3-MoE, or a GroveMoE export whose
modelling code is byte for byte ours, loaded with ``trust_remote_code``; other code shipped in
a folder is never executed), otherwise (e.g. the released GroveMoE format, whose code is not
shipped) with our model code. Megatron checkpoints, and (config, state) pairs, run with our
model code in the current world (call inside
:func:`~megatron_grove.runtime.single_process_world`). Everything runs in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from megatron_grove.checkpointing.model_io import (
    build_model,
    load_megatron_model,
    load_state_into_model,
)
from megatron_grove.config import GroveConfig
from megatron_grove.hf_conversion.hf_checkpoint import load_hf_checkpoint
from megatron_grove.model import gpt_logits

__all__ = ["LogitsFn", "sample_tokens", "model_logits", "load_transformers_model",
           "checkpoint_logits"]

# ids [b, L] int64 -> logits [b, L, V] fp32
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def sample_tokens(tokenizer_dir: str | None, vocab_size: int, count: int, seed: int = 0
                  ) -> tuple[np.ndarray, str]:
    """``count`` token ids to run models on, and what they are: the start of the embedded
    held-out text (Hamlet) through the checkpoint's tokenizer, or seeded random ids when the
    checkpoint carries no tokenizer."""
    from megatron_grove.data.datasets import heldout_text_path
    from megatron_grove.data.tokenizer import load_tokenizer

    if tokenizer_dir is not None:
        text = Path(heldout_text_path()).read_text(encoding="utf-8")
        ids = np.asarray(load_tokenizer(tokenizer_dir).encode(text[:count * 16]), dtype=np.int64)
        if len(ids) >= count and int(ids.max()) < vocab_size:
            return ids[:count], f"the first {count} tokens of Hamlet (the embedded held-out text)"
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=count).astype(np.int64)
    return ids, f"{count} random token ids (seed {seed}; no usable tokenizer in the checkpoint)"


def model_logits(cfg: GroveConfig, state: Mapping[str, torch.Tensor]) -> LogitsFn:
    """Our model of (``cfg``, global ``state``) in fp32, in the current world."""
    model = build_model(cfg, dtype=torch.float32)
    load_state_into_model(model, cfg, state)
    model.eval()
    return lambda ids: gpt_logits(model, ids, cfg.model.vocab_size)


def _is_our_remote_code(folder: Path) -> bool:
    from megatron_grove.hf_conversion import remote_code

    return all((folder / name).is_file() and (folder / name).read_text() ==
               remote_code.source(name) for name in remote_code.REMOTE_CODE_FILES)


def load_transformers_model(path: str | Path, device: torch.device | str = "cpu"):
    """The HF folder at ``path`` as a ``transformers`` causal LM in fp32 on ``device`` and a
    phrase naming what runs it, when ``transformers`` can run it (stock Llama / Qwen3 /
    Qwen3-MoE, or a GroveMoE export whose modelling code is byte for byte ours); else None."""
    import transformers

    path = Path(path)
    hf_config = json.loads((path / "config.json").read_text())
    ours = "auto_map" in hf_config and _is_our_remote_code(path)
    stock = hf_config.get("model_type") in ("llama", "qwen3", "qwen3_moe") and not any(
        "chunk_experts" in name for name in _tensor_names(path))
    if not (ours or stock):
        return None
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, trust_remote_code=ours).eval().to(device)
    return model, (f"transformers {transformers.__version__}"
                   + (" with the export's GroveMoE modelling code" if ours else ""))


def checkpoint_logits(path: str | Path, fmt: str) -> tuple[LogitsFn, str]:
    """The logits function of the checkpoint at ``path`` (``fmt`` ``hf`` or ``megatron``) and
    a phrase saying what runs it (module docstring)."""
    if fmt == "megatron":
        cfg, model = load_megatron_model(path, dtype=torch.float32)
        model.eval()
        return (lambda ids: gpt_logits(model, ids, cfg.model.vocab_size)), "our model code"
    loaded = load_transformers_model(path)
    if loaded is not None:
        hf_model, runner = loaded

        @torch.no_grad()
        def run(ids: torch.Tensor) -> torch.Tensor:
            return hf_model(input_ids=ids, use_cache=False).logits.float()

        return run, runner
    cfg, state = load_hf_checkpoint(path)
    return model_logits(cfg, state), "our model code (no runnable modelling code of its own)"


def _tensor_names(path: Path) -> list[str]:
    from megatron_grove.hf_conversion.safetensors_io import HFTensors

    with HFTensors(path) as tensors:
        return list(tensors)
