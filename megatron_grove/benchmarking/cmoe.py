"""CMoE on SmolLM2-135M-Instruct: dense vs carved perplexity on held-out texts, carving time.

The dense model is scored through Hugging Face ``transformers``, a carved one through our
Megatron model loaded from the checkpoint the carving wrote; both with
:func:`megatron_grove.evaluation.window_perplexity` (window k covers tokens [kL, kL+L]: inputs
its first L, targets its last L), the one convention of :mod:`megatron_grove.evaluation`.

The activation-routing oracle (:class:`ActivationOracleFFN`) is a measured reference, not a
servable model: every token computes every routed expert and keeps the ``A`` of largest
activation mass ``sum_j |h_j|``, what the linear router learns to predict from the FFN input.
It runs in the dense ``transformers`` model with each FFN replaced by the carved experts of the
carving's HF-style export.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_grove.evaluation import PerplexityResult, window_perplexity

__all__ = ["parse_spec", "heldout_tokens", "hf_perplexity", "megatron_perplexity",
           "ActivationOracleFFN", "oracle_perplexity", "carve_and_measure"]


def parse_spec(name: str, router: str = "linear"):
    """``"S3A3E8"`` -> :class:`~megatron_grove.cmoe.carve_model.CarveSpec`."""
    from megatron_grove.cmoe.carve_model import CarveSpec

    match = re.fullmatch(r"S(\d+)A(\d+)E(\d+)", name)
    if match is None:
        raise ValueError(f"{name!r}: expected SxAyEz, e.g. S3A3E8")
    return CarveSpec(*map(int, match.groups()), router=router)


def heldout_tokens(tokenizer_dir: str, text_path: str, seq_length: int,
                   max_windows: Optional[int]) -> torch.Tensor:
    """The text's token ids, cut to ``max_windows`` windows of ``seq_length`` (+1 target)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(Path(text_path).read_text(), add_special_tokens=False)["input_ids"]
    if max_windows is not None:
        ids = ids[:max_windows * seq_length + 1]
    return torch.tensor(ids)


def _hf_model(hf_dir: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()


def hf_perplexity(hf_dir: str, tokens: torch.Tensor, seq_length: int) -> PerplexityResult:
    """Perplexity of a Hugging Face causal LM folder, computed by ``transformers``."""
    model = _hf_model(hf_dir)
    with torch.no_grad():
        return window_perplexity(lambda ids: model(input_ids=ids).logits, tokens, seq_length)


def megatron_perplexity(checkpoint: str, texts: dict[str, torch.Tensor],
                        seq_length: int) -> dict[str, PerplexityResult]:
    """Perplexity of one of our checkpoints on each of ``texts`` (name -> token ids), in a
    one-process world of its own."""
    from megatron_grove.evaluation import perplexity
    from megatron_grove.hf_conversion.megatron_io import load_megatron_model
    from megatron_grove.runtime import single_process_world

    with single_process_world():
        cfg, model = load_megatron_model(checkpoint)
        return {name: perplexity(model, tokens, seq_length, cfg.model.vocab_size,
                                 progress=False) for name, tokens in texts.items()}


class ActivationOracleFFN(torch.nn.Module):
    """A carved FFN routed by the activation oracle: ``x`` ``[..., H]`` -> shared(x) + the
    ``topk`` routed experts of largest ``sum_j |h_j|`` (each at weight 1).

    ``shared``: (gate ``[S*m, H]``, up, down ``[H, S*m]``) or None; ``experts``: (gate
    ``[E, m, H]``, up ``[E, m, H]``, down ``[E, H, m]``)."""

    def __init__(self, shared: Optional[tuple[torch.Tensor, ...]],
                 experts: tuple[torch.Tensor, ...], topk: int) -> None:
        super().__init__()
        self.shared, self.experts, self.topk = shared, experts, topk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.experts
        flat = x.reshape(-1, x.shape[-1])
        hidden = F.silu(torch.einsum("th,emh->tem", flat, gate)) * torch.einsum(
            "th,emh->tem", flat, up)  # [T, E, m]
        chosen = hidden.abs().sum(-1).topk(self.topk, dim=-1).indices  # [T, k]
        keep = torch.zeros(hidden.shape[:2], dtype=hidden.dtype).scatter_(1, chosen, 1.0)
        out = torch.einsum("tem,ehm->th", hidden * keep[..., None], down)
        if self.shared is not None:
            s_gate, s_up, s_down = self.shared
            out = out + (F.silu(flat @ s_gate.T) * (flat @ s_up.T)) @ s_down.T
        return out.reshape(x.shape)


def oracle_perplexity(carved_hf_dir: str, texts: dict[str, torch.Tensor],
                      seq_length: int) -> dict[str, PerplexityResult]:
    """Perplexity of a carving's HF-style export (``carved/hf``) routed by the activation
    oracle, on each of ``texts``."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from megatron_grove.hf_conversion.safetensors_io import HFTensors, read_hf_config

    config = read_hf_config(carved_hf_dir)
    cmoe = config.pop("cmoe")
    config.pop("torch_dtype", None)
    with HFTensors(carved_hf_dir) as tensors:
        state = {name: tensors[name].float() for name in tensors}
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config),
                                                 dtype=torch.float32)
    model.load_state_dict({k: v for k, v in state.items() if ".mlp." not in k}, strict=False)
    model.tie_weights()
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}.mlp."
        bank = [torch.stack([state[f"{prefix}experts.{e}.{name}_proj.weight"]
                             for e in range(cmoe["num_routed_experts"])])
                for name in ("gate", "up", "down")]
        shared = (tuple(state[f"{prefix}shared_expert.{name}_proj.weight"]
                        for name in ("gate", "up", "down"))
                  if cmoe["num_shared_experts"] else None)
        layer.mlp = ActivationOracleFFN(shared, tuple(bank), cmoe["num_experts_per_tok"])
    model.eval()
    with torch.no_grad():
        return {name: window_perplexity(lambda ids: model(input_ids=ids).logits, tokens,
                                        seq_length) for name, tokens in texts.items()}


def carve_and_measure(model: str, spec_name: str, router: str, out: Path,
                      texts: dict[str, torch.Tensor], seq_length: int,
                      calibration_tokens: int, oracle: bool = False) -> list[dict]:
    """Carve ``model`` (``.gguf`` or HF folder) at ``spec_name`` with ``router`` into
    ``out/<spec>_<router>_<tokens>`` (kept if already there) and measure it on every text
    (and the activation oracle of the same carving with ``oracle``): one record per (model,
    text), with the carving record's phase timings."""
    from megatron_grove.cmoe.pipeline import CarveJob, carve_model_to

    target = out / f"{spec_name}_{router}_{calibration_tokens}"
    if not target.exists():
        carve_model_to(CarveJob(model=model, spec=parse_spec(spec_name, router),
                                output=str(target), calibration_tokens=calibration_tokens,
                                progress=False))
    record = json.loads((target / "carve.json").read_text())
    timing = {k: record[k] for k in record if k.endswith("_s") or k in (
        "calibration_tokens", "load_average_1min")}
    results = [{"model": spec_name, "router": router, "text": name, "ppl": result.ppl,
                "tokens": result.tokens, **timing}
               for name, result in megatron_perplexity(str(target / "megatron"), texts,
                                                       seq_length).items()]
    if oracle:
        results += [{"model": spec_name, "router": "oracle", "text": name, "ppl": result.ppl,
                     "tokens": result.tokens, "calibration_tokens": record["calibration_tokens"]}
                    for name, result in oracle_perplexity(str(target / "hf"), texts,
                                                          seq_length).items()]
    return results
