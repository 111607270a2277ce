"""CMoE on SmolLM2-135M-Instruct: dense vs carved perplexity on held-out text, and carving time.

The dense model is scored through Hugging Face ``transformers``, a carved one through our
Megatron model loaded from the checkpoint the carving wrote; both with
:func:`megatron_grove.evaluation.window_perplexity` (window k covers tokens [kL, kL+L]: inputs
its first L, targets its last L), the one convention of :mod:`megatron_grove.evaluation`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch

from megatron_grove.evaluation import PerplexityResult, window_perplexity

__all__ = ["parse_spec", "heldout_tokens", "hf_perplexity", "megatron_perplexity",
           "carve_and_measure"]


def parse_spec(name: str):
    """``"S3A3E8"`` -> :class:`~megatron_grove.cmoe.carve_model.CarveSpec`."""
    from megatron_grove.cmoe.carve_model import CarveSpec

    match = re.fullmatch(r"S(\d+)A(\d+)E(\d+)", name)
    if match is None:
        raise ValueError(f"{name!r}: expected SxAyEz, e.g. S3A3E8")
    return CarveSpec(*map(int, match.groups()))


def heldout_tokens(tokenizer_dir: str, text_path: str, seq_length: int,
                   max_windows: Optional[int]) -> torch.Tensor:
    """The text's token ids, cut to ``max_windows`` windows of ``seq_length`` (+1 target)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(Path(text_path).read_text(), add_special_tokens=False)["input_ids"]
    if max_windows is not None:
        ids = ids[:max_windows * seq_length + 1]
    return torch.tensor(ids)


def hf_perplexity(hf_dir: str, tokens: torch.Tensor, seq_length: int) -> PerplexityResult:
    """Perplexity of a Hugging Face causal LM folder, computed by ``transformers``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return window_perplexity(lambda ids: model(input_ids=ids).logits, tokens, seq_length)


def megatron_perplexity(checkpoint: str, tokens: torch.Tensor,
                        seq_length: int) -> PerplexityResult:
    """Perplexity of one of our checkpoints (a one-process world of its own)."""
    from megatron_grove.evaluation import perplexity
    from megatron_grove.hf_conversion.megatron_io import load_megatron_model
    from megatron_grove.runtime import single_process_world

    with single_process_world():
        cfg, model = load_megatron_model(checkpoint)
        return perplexity(model, tokens, seq_length, cfg.model.vocab_size, progress=False)


def carve_and_measure(hf_dir: str, spec_name: str, out: Path, tokens: torch.Tensor,
                      seq_length: int) -> dict:
    """Carve ``hf_dir`` at ``spec_name`` into ``out/spec_name`` (kept if already there) and
    measure its perplexity: ``{"model", "ppl", "tokens", "construction_s"}``."""
    from megatron_grove.cmoe.pipeline import CarveJob, carve_model_to

    target = out / spec_name
    if not target.exists():
        carve_model_to(CarveJob(model=hf_dir, spec=parse_spec(spec_name), output=str(target),
                                progress=False))
    record = json.loads((target / "carve.json").read_text())
    result = megatron_perplexity(str(target / "megatron"), tokens, seq_length)
    return {"model": spec_name, "ppl": result.ppl, "tokens": result.tokens,
            "construction_s": record["construction_s"]}
