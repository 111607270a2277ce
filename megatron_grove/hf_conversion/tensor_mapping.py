"""Tensor names and shapes: Hugging Face (Llama / Qwen3 / Qwen3-MoE / GroveMoE) <-> Megatron.

The Megatron side is the *global* state dict of our ``GPTModel`` as one process at TP=1,
EP=1 holds it (``local_experts.{e}`` = global expert ``e``, adjugate ``g`` =
``adjugate_experts.local_experts.{g}``), without ``_extra_state`` entries and with the
unpadded vocabulary (``[V, H]``; :mod:`megatron_grove.checkpointing.model_io` pads to Megatron's size). Per decoder
layer ``i`` (HF prefix ``model.layers.{i}.``, Megatron prefix ``decoder.layers.{i}.``)::

    HF                                     Megatron                       how
    input_layernorm.weight [H]             input_layernorm.weight         copy
    self_attn.{q,k,v}_proj.weight          self_attention.linear_qkv      per KV group g:
      [nq*d, H], [nkv*d, H], [nkv*d, H]      .weight [(nq+2nkv)*d, H]     [q heads of g; k_g; v_g]
    self_attn.o_proj.weight [H, nq*d]      self_attention.linear_proj.weight  copy
    self_attn.{q,k}_norm.weight [d]        self_attention.{q,k}_layernorm.weight (Qwen3)
    post_attention_layernorm.weight        pre_mlp_layernorm.weight       copy
    dense:  mlp.{gate,up}_proj [F, H]      mlp.linear_fc1.weight [2F, H]  [gate; up]
            mlp.down_proj [H, F]           mlp.linear_fc2.weight          copy
    MoE:    mlp.gate.weight [E, H]         mlp.router.weight              copy
            mlp.expert_bias [E] (Grove)    mlp.router.expert_bias         copy
            mlp.experts.{e}.*              mlp.experts.local_experts.{e}.linear_fc{1,2}
            mlp.chunk_experts.{g}.*        mlp.adjugate_experts.local_experts.{g}.linear_fc{1,2}

plus ``model.embed_tokens.weight`` <-> ``embedding.word_embeddings.weight``, ``model.norm`` <->
``decoder.final_layernorm`` and ``lm_head.weight`` <-> ``output_layer.weight`` (absent when
the embeddings are tied). Every conversion is a pure re-arrangement (``cat`` / slicing), so
HF -> Megatron -> HF reproduces every tensor bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch

from megatron_grove.config import GroveConfig
from megatron_grove.hf_conversion.hf_config import HFFormatError

__all__ = ["TensorGroup", "tensor_groups", "hf_to_megatron", "megatron_to_hf",
           "expected_hf_shapes", "expected_megatron_shapes", "check_tensors"]


@dataclass(frozen=True)
class TensorGroup:
    """One Megatron tensor and the HF tensors it is made of.

    ``kind``: ``copy`` (one HF tensor), ``cat`` (HF tensors concatenated on dim 0) or ``qkv``
    (q, k, v interleaved per KV group). ``hf_shapes`` are the HF tensors' shapes.
    """

    megatron: str
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    kind: str = "copy"


def _swiglu(groups: list, mg: str, hf: str, hidden: int, ffn: int) -> None:
    groups.append(TensorGroup(f"{mg}.linear_fc1.weight",
                              (f"{hf}.gate_proj.weight", f"{hf}.up_proj.weight"),
                              ((ffn, hidden), (ffn, hidden)), "cat"))
    groups.append(TensorGroup(f"{mg}.linear_fc2.weight", (f"{hf}.down_proj.weight",),
                              ((hidden, ffn),)))


def _attention_heads(cfg: GroveConfig) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of ``cfg.model``."""
    m = cfg.model
    return m.num_attention_heads, m.kv_heads, m.head_dim


def tensor_groups(cfg: GroveConfig) -> list[TensorGroup]:
    """Every tensor of the model described by ``cfg.model`` / ``cfg.moe``, in model order."""
    m, e = cfg.model, cfg.moe
    H, V = m.hidden_size, m.vocab_size
    nq, nkv, d = _attention_heads(cfg)
    groups: list[TensorGroup] = [
        TensorGroup("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), ((V, H),))]
    for i in range(m.num_layers):
        hf, mg = f"model.layers.{i}", f"decoder.layers.{i}"
        attn, sa = f"{hf}.self_attn", f"{mg}.self_attention"
        groups += [
            TensorGroup(f"{mg}.input_layernorm.weight", (f"{hf}.input_layernorm.weight",), ((H,),)),
            TensorGroup(f"{sa}.linear_qkv.weight",
                        (f"{attn}.q_proj.weight", f"{attn}.k_proj.weight", f"{attn}.v_proj.weight"),
                        ((nq * d, H), (nkv * d, H), (nkv * d, H)), "qkv"),
            TensorGroup(f"{sa}.linear_proj.weight", (f"{attn}.o_proj.weight",), ((H, nq * d),)),
        ]
        if m.qk_layernorm:
            groups += [TensorGroup(f"{sa}.q_layernorm.weight", (f"{attn}.q_norm.weight",), ((d,),)),
                       TensorGroup(f"{sa}.k_layernorm.weight", (f"{attn}.k_norm.weight",), ((d,),))]
        groups.append(TensorGroup(f"{mg}.pre_mlp_layernorm.weight",
                                  (f"{hf}.post_attention_layernorm.weight",), ((H,),)))
        if not e.num_experts or i < e.first_k_dense_layers:
            _swiglu(groups, f"{mg}.mlp", f"{hf}.mlp", H, m.ffn_hidden_size)
            continue
        E = e.num_experts
        groups.append(TensorGroup(f"{mg}.mlp.router.weight", (f"{hf}.mlp.gate.weight",), ((E, H),)))
        if e.num_expert_groups:
            groups.append(TensorGroup(f"{mg}.mlp.router.expert_bias", (f"{hf}.mlp.expert_bias",),
                                      ((E,),)))
        for x in range(E):
            _swiglu(groups, f"{mg}.mlp.experts.local_experts.{x}", f"{hf}.mlp.experts.{x}", H,
                    e.ffn_hidden_size)
        for g in range(e.num_expert_groups):
            _swiglu(groups, f"{mg}.mlp.adjugate_experts.local_experts.{g}",
                    f"{hf}.mlp.chunk_experts.{g}", H, e.adjugate_ffn_hidden_size)
    groups.append(TensorGroup("decoder.final_layernorm.weight", ("model.norm.weight",), ((H,),)))
    if not m.tie_embeddings:
        groups.append(TensorGroup("output_layer.weight", ("lm_head.weight",), ((V, H),)))
    return groups


def _qkv_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, nkv: int) -> torch.Tensor:
    """``q [nq*d, H]``, ``k``/``v`` ``[nkv*d, H]`` -> ``[nkv, (nq/nkv + 2) * d, H]`` rows, flat."""
    H = q.shape[1]
    q = q.reshape(nkv, -1, H)
    return torch.cat([q, k.reshape(nkv, -1, H), v.reshape(nkv, -1, H)], dim=1).reshape(-1, H)


def _qkv_unpack(qkv: torch.Tensor, nkv: int, d: int) -> tuple[torch.Tensor, ...]:
    H = qkv.shape[1]
    per_group = qkv.reshape(nkv, -1, H)
    q_rows = per_group.shape[1] - 2 * d
    q, k, v = per_group.split([q_rows, d, d], dim=1)
    return tuple(t.reshape(-1, H).contiguous() for t in (q, k, v))


def expected_hf_shapes(cfg: GroveConfig) -> dict[str, tuple[int, ...]]:
    return {name: shape for g in tensor_groups(cfg) for name, shape in zip(g.hf, g.hf_shapes)}


def expected_megatron_shapes(cfg: GroveConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for g in tensor_groups(cfg):
        first = g.hf_shapes[0]
        out[g.megatron] = (sum(s[0] for s in g.hf_shapes), *first[1:]) if len(g.hf) > 1 else first
    return out


def check_tensors(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
                  where: str) -> None:
    """Raise :class:`HFFormatError` naming the first missing, unexpected or mis-shaped tensors
    of a checkpoint (``where``: what to call it in the message)."""
    missing = [n for n in expected if n not in found]
    unexpected = [n for n in found if n not in expected]
    wrong = [f"{n} {tuple(found[n])} (expected {tuple(expected[n])})"
             for n in expected if n in found and tuple(found[n]) != tuple(expected[n])]

    def first(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) missing ({first(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) ({first(unexpected)})")
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of the wrong shape ({first(wrong)})")
    if problems:
        raise HFFormatError(f"{where}: {'; '.join(problems)}: the checkpoint is partial or "
                            "does not match its config")


def _convert(groups: list[TensorGroup], read: Callable[[str], torch.Tensor], to_megatron: bool,
             nkv: int, d: int) -> Iterator[tuple[str, torch.Tensor]]:
    for g in groups:
        if to_megatron:
            parts = [read(n) for n in g.hf]
            if g.kind == "qkv":
                yield g.megatron, _qkv_pack(*parts, nkv)
            else:
                yield g.megatron, parts[0] if g.kind == "copy" else torch.cat(parts, dim=0)
        else:
            whole = read(g.megatron)
            if g.kind == "qkv":
                parts = _qkv_unpack(whole, nkv, d)
            elif g.kind == "cat":
                parts = [p.contiguous() for p in whole.split([s[0] for s in g.hf_shapes], dim=0)]
            else:
                parts = [whole]
            yield from zip(g.hf, parts)


def hf_to_megatron(hf: Mapping[str, torch.Tensor], cfg: GroveConfig,
                   progress: Callable[[Iterator], Iterator] = iter) -> dict[str, torch.Tensor]:
    """HF tensors -> the Megatron global state dict (checks names and shapes first).
    ``progress`` wraps the iteration over tensor groups (e.g. ``tqdm``)."""
    shapes = getattr(hf, "shapes", None) or {n: tuple(t.shape) for n, t in hf.items()}
    check_tensors(shapes, expected_hf_shapes(cfg), "Hugging Face checkpoint")
    _, nkv, d = _attention_heads(cfg)
    return dict(progress(_convert(tensor_groups(cfg), hf.__getitem__, True, nkv, d)))


def megatron_to_hf(mg: Mapping[str, torch.Tensor], cfg: GroveConfig,
                   progress: Callable[[Iterator], Iterator] = iter) -> dict[str, torch.Tensor]:
    """The Megatron global state dict -> HF tensors (checks names and shapes first)."""
    check_tensors({n: tuple(t.shape) for n, t in mg.items()}, expected_megatron_shapes(cfg),
                  "Megatron checkpoint")
    _, nkv, d = _attention_heads(cfg)
    return dict(progress(_convert(tensor_groups(cfg), mg.__getitem__, False, nkv, d)))
