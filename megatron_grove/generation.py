"""Text generation from a checkpoint: prompt token ids -> new token ids, greedy or sampled.

Two backends (:func:`load_generator`):

* ``transformers`` — a Hugging Face folder ``transformers`` can run
  (:func:`~megatron_grove.hf_conversion.runners.load_transformers_model`: stock Llama / Qwen3 /
  Qwen3-MoE, or our GroveMoE export with its own modelling code), through
  ``model.generate()`` with its KV cache;
* ``ours`` — our Megatron model (a Megatron checkpoint, or any HF folder through our
  converter), recomputing the whole context for every new token (no KV cache); a context
  longer than ``model.seq_length`` keeps its last ``seq_length`` tokens.

``temperature`` 0 is greedy decoding (both backends give the same tokens); otherwise tokens are
drawn from ``softmax(logits / temperature)`` over the ``top_k`` most likely ones (0: all), from
a generator seeded with ``seed`` (reproducible per backend, not across them). Generation stops
after ``max_new_tokens``, at the end-of-document token, or when ``stop(new ids)`` says so (chat:
the end of the assistant's turn, :meth:`megatron_grove.data.chat.ChatTemplate.turn_ended`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

__all__ = ["Sampling", "pick_next", "generate_with_logits", "Generator", "load_generator", "Stop"]

Stop = Callable[[list[int]], bool]
"""Whether generation should end after these new token ids."""


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = the whole vocabulary
    seed: int = 0


def pick_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from the last position's logits ``[V]``."""
    if sampling.temperature <= 0:
        return int(logits.argmax())
    scaled = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k < scaled.numel():
        kth = scaled.topk(sampling.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate_with_logits(logits_of: Callable[[torch.Tensor], torch.Tensor], prompt: list[int],
                         sampling: Sampling, context: int, eos: Optional[int] = None,
                         device: torch.device | str = "cpu", stop: Optional[Stop] = None
                         ) -> list[int]:
    """New tokens after ``prompt``; ``logits_of(ids [1, n] on device) -> [1, n, V]`` sees at
    most the last ``context`` tokens; ``stop(new ids)`` True ends generation."""
    generator = torch.Generator().manual_seed(sampling.seed)
    ids = list(prompt)
    for _ in range(sampling.max_new_tokens):
        window = torch.tensor([ids[-context:]], dtype=torch.int64, device=device)
        token = pick_next(logits_of(window)[0, -1].cpu(), sampling, generator)
        ids.append(token)
        if token == eos or (stop is not None and stop(ids[len(prompt):])):
            break
    return ids[len(prompt):]


@dataclass
class Generator:
    """A loaded checkpoint ready to generate: ``backend`` (what runs it), its tokenizer folder
    (None when it carries none) and ``generate(prompt ids, sampling, eos, stop=None) -> new
    ids``."""

    backend: str
    tokenizer_dir: Optional[str]
    generate: Callable[..., list[int]]


def _transformers_generate(model) -> Callable[..., list[int]]:
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopWhen(StoppingCriteria):
        def __init__(self, stop: Stop, prompt_length: int) -> None:
            self.stop, self.prompt_length = stop, prompt_length

        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            done = self.stop(input_ids[0, self.prompt_length:].tolist())
            return torch.full((input_ids.shape[0],), done, dtype=torch.bool,
                              device=input_ids.device)

    @torch.no_grad()
    def generate(prompt: list[int], sampling: Sampling, eos: Optional[int],
                 stop: Optional[Stop] = None) -> list[int]:
        torch.manual_seed(sampling.seed)
        ids = torch.tensor([prompt], dtype=torch.int64, device=model.device)
        sample = sampling.temperature > 0
        out = model.generate(ids, attention_mask=torch.ones_like(ids),
                             max_new_tokens=sampling.max_new_tokens, do_sample=sample,
                             temperature=sampling.temperature if sample else None,
                             top_k=(sampling.top_k or None) if sample else None, top_p=None,
                             eos_token_id=eos, pad_token_id=eos, use_cache=True,
                             stopping_criteria=StoppingCriteriaList(
                                 [_StopWhen(stop, len(prompt))] if stop else []))
        return out[0, len(prompt):].tolist()

    return generate


def load_generator(path: str | Path, backend: str = "auto",
                   device: torch.device | str = "cpu") -> Generator:
    """The checkpoint at ``path`` (Megatron root / ``iter_*`` folder, or an HF folder) ready to
    generate on ``device`` (fp32); ``backend``: ``auto`` (``transformers`` for an HF folder it
    can run, else ``ours``), ``transformers`` or ``ours`` (module docstring). ``ours`` needs a
    world (:func:`~megatron_grove.runtime.single_process_world`). Raises ``ValueError`` for a
    ``transformers`` request it cannot serve."""
    from megatron_grove.evaluation import load_for_evaluation
    from megatron_grove.hf_conversion import is_hf_checkpoint
    from megatron_grove.hf_conversion.runners import load_transformers_model
    from megatron_grove.model import gpt_logits

    path = Path(path)
    hf = is_hf_checkpoint(path)
    if backend != "ours" and hf:
        loaded = load_transformers_model(path, device)
        if loaded is not None:
            model, runner = loaded
            tokenizer = str(path) if (path / "tokenizer.json").is_file() else None
            return Generator(f"{runner}, generate() with KV cache", tokenizer,
                             _transformers_generate(model))
    if backend == "transformers":
        raise ValueError(f"{path}: transformers cannot run this checkpoint (not a Hugging Face "
                         "folder with stock or our GroveMoE modelling code); use --backend ours")
    loaded = load_for_evaluation(path, "fp32", device)
    model, cfg = loaded.model.eval(), loaded.config

    def generate(prompt: list[int], sampling: Sampling, eos: Optional[int],
                 stop: Optional[Stop] = None) -> list[int]:
        return generate_with_logits(lambda ids: gpt_logits(model, ids, cfg.model.vocab_size),
                                    prompt, sampling, cfg.model.seq_length, eos, device, stop)

    return Generator(f"our model code ({loaded.format} checkpoint, no KV cache)",
                     loaded.tokenizer_dir, generate)
