"""CMoE on SmolLM2-135M-Instruct: dense vs carved perplexity on held-out texts, carving time.

The dense model is scored through Hugging Face ``transformers``, a carved one through our
Megatron model loaded from the checkpoint the carving wrote; both with
:func:`megatron_grove.evaluation.window_perplexity` (window k covers tokens [kL, kL+L]: inputs
its first L, targets its last L), the one convention of :mod:`megatron_grove.evaluation`.

The activation-routing oracle is a measured reference, not a servable model: every token
computes every routed expert and keeps the ``A`` of largest activation mass ``sum_j |h_j|``,
what the linear router learns to predict from the FFN input. It runs, like the carved model's
own router can (:func:`export_perplexity`, a check of the export and cheaper than our Megatron
model on CPU), in the dense ``transformers`` model with each FFN replaced by the carved experts
of the carving's HF-style export (:class:`ExportedCarvedFFN`).
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
           "ExportedCarvedFFN", "export_perplexity", "carve_and_measure"]


def parse_spec(name: str, router: str = "linear"):
    """``"S3A3E8"`` -> :class:`~megatron_grove.carving.cmoe.CarveSpec`."""
    from megatron_grove.carving.cmoe import CarveSpec

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
    from megatron_grove.checkpointing.model_io import load_megatron_model
    from megatron_grove.runtime import single_process_world

    with single_process_world():
        cfg, model = load_megatron_model(checkpoint)
        return {name: perplexity(model, tokens, seq_length, cfg.model.vocab_size,
                                 progress=False) for name, tokens in texts.items()}


class ExportedCarvedFFN(torch.nn.Module):
    """A freshly carved FFN of an HF-style export: ``x`` ``[..., H]`` -> shared(x) + the
    ``topk`` routed experts of highest router logit, each at weight 1 (what both CMoE routers
    compute at carving: expert bias and scale 0). ``router``: ``"linear"`` (``weight``,
    ``score_bias``), ``"paper"`` (``gate_rows``, ``up_rows``) or ``"oracle"``, the activation
    oracle (logit: the expert's activation mass ``sum_j |h_j|``).

    ``shared``: (gate ``[S*m, H]``, up, down ``[H, S*m]``) or None; ``experts``: (gate
    ``[E, m, H]``, up ``[E, m, H]``, down ``[E, H, m]``); ``rows``: the router's tensors."""

    def __init__(self, shared: Optional[tuple[torch.Tensor, ...]],
                 experts: tuple[torch.Tensor, ...], topk: int, router: str,
                 rows: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.shared, self.experts, self.topk = shared, experts, topk
        self.router, self.rows = router, rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = self.experts
        flat = x.reshape(-1, x.shape[-1])
        hidden = F.silu(torch.einsum("th,emh->tem", flat, gate)) * torch.einsum(
            "th,emh->tem", flat, up)  # [T, E, m]
        if self.router == "oracle":
            logits = hidden.abs().sum(-1)
        elif self.router == "linear":
            logits = flat @ self.rows["weight"].T + self.rows["score_bias"]
        else:
            logits = (F.silu(flat @ self.rows["gate_rows"].T)
                      * (flat @ self.rows["up_rows"].T)).abs()
        chosen = logits.topk(self.topk, dim=-1).indices  # [T, k]
        keep = torch.zeros(hidden.shape[:2], dtype=hidden.dtype).scatter_(1, chosen, 1.0)
        out = torch.einsum("tem,ehm->th", hidden * keep[..., None], down)
        if self.shared is not None:
            s_gate, s_up, s_down = self.shared
            out = out + (F.silu(flat @ s_gate.T) * (flat @ s_up.T)) @ s_down.T
        return out.reshape(x.shape)


def export_perplexity(carved_hf_dir: str, routers: list[str], texts: dict[str, torch.Tensor],
                      seq_length: int) -> dict[tuple[str, str], PerplexityResult]:
    """Perplexity of a carving's HF-style export (``carved/hf``) in the dense ``transformers``
    model with :class:`ExportedCarvedFFN` FFNs, for each of ``routers`` (the export's own and
    ``"oracle"``) on each of ``texts``: ``{(router, text): result}``."""
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
    model.eval()
    results = {}
    for router in routers:
        if router not in ("oracle", cmoe["router"]):
            raise ValueError(f"{carved_hf_dir} holds the {cmoe['router']} router, not {router}")
        for i, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{i}.mlp."
            bank = [torch.stack([state[f"{prefix}experts.{e}.{name}_proj.weight"]
                                 for e in range(cmoe["num_routed_experts"])])
                    for name in ("gate", "up", "down")]
            shared = (tuple(state[f"{prefix}shared_expert.{name}_proj.weight"]
                            for name in ("gate", "up", "down"))
                      if cmoe["num_shared_experts"] else None)
            rows = {k[len(prefix) + 7:]: v for k, v in state.items()
                    if k.startswith(prefix + "router.")}
            layer.mlp = ExportedCarvedFFN(shared, tuple(bank), cmoe["num_experts_per_tok"],
                                          router, rows)
        with torch.no_grad():
            for name, tokens in texts.items():
                results[router, name] = window_perplexity(
                    lambda ids: model(input_ids=ids).logits, tokens, seq_length)
    return results


def carve_and_measure(model: str, spec_name: str, router: str, out: Path,
                      texts: dict[str, torch.Tensor], seq_length: int,
                      calibration_tokens: int, oracle: bool = False,
                      megatron: bool = False) -> list[dict]:
    """Carve ``model`` (``.gguf`` or HF folder) at ``spec_name`` with ``router`` into
    ``out/<spec>_<router>_<tokens>`` (kept if already there) and measure it on every text
    through its HF-style export (and the activation oracle of the same carving with
    ``oracle``; our Megatron model of the checkpoint too with ``megatron``): one record per
    (model, text, way), with the carving record's phase timings."""
    from megatron_grove.carving.pipeline import CarveJob, carve_model_to

    target = out / f"{spec_name}_{router}_{calibration_tokens}"
    if not target.exists():
        carve_model_to(CarveJob(model=model, spec=parse_spec(spec_name, router),
                                output=str(target), calibration_tokens=calibration_tokens,
                                progress=False))
    record = json.loads((target / "carve.json").read_text())
    timing = {k: record[k] for k in record if k.endswith("_s") or k in (
        "calibration_tokens", "load_average_1min")}
    results = [{"model": spec_name, "router": name, "text": text, "via": "hf-export",
                "ppl": result.ppl, "tokens": result.tokens,
                **(timing if name == router else {"calibration_tokens": calibration_tokens})}
               for (name, text), result in export_perplexity(
                   str(target / "hf"), [router] + ["oracle"] * oracle, texts,
                   seq_length).items()]
    if megatron:
        results += [{"model": spec_name, "router": router, "text": text, "via": "megatron",
                     "ppl": result.ppl, "tokens": result.tokens}
                    for text, result in megatron_perplexity(str(target / "megatron"), texts,
                                                            seq_length).items()]
    return results
