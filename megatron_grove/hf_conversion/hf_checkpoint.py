"""Whole Hugging Face checkpoints <-> (our config, the global Megatron state dict), and the
global state dict of a Megatron checkpoint to export."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from megatron_grove.checkpointing import read_checkpoint_config
from megatron_grove.checkpointing.model_io import load_megatron_model, model_state_dict
from megatron_grove.config import GroveConfig, config_from_dict
from megatron_grove.hf_conversion.hf_config import (
    HFFormatError,
    grove_config_from_hf,
    hf_config_from_grove,
)
from megatron_grove.hf_conversion.packed_experts import PerExpertView
from megatron_grove.hf_conversion.safetensors_io import (
    HFTensors,
    read_hf_config,
    write_hf_checkpoint,
)
from megatron_grove.hf_conversion.tensor_mapping import hf_to_megatron, megatron_to_hf

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint", "load_megatron_state"]

_DTYPE_NAMES = {"F32": "fp32", "BF16": "bf16"}


def load_hf_checkpoint(path: str | Path, progress: Callable[[Iterator], Iterator] = iter
                       ) -> tuple[GroveConfig, dict[str, torch.Tensor]]:
    """A HF checkpoint folder -> (:class:`GroveConfig` with ``model``/``moe`` of the checkpoint,
    ``runtime.dtype`` its weights' dtype and ``data.tokenizer`` the folder when it holds a
    ``tokenizer.json``; the global Megatron state dict). Experts may be stored per expert or
    packed (:mod:`.packed_experts`). Raises :class:`HFFormatError` on an unsupported, partial or
    mismatched checkpoint."""
    path = Path(path)
    hf_config = read_hf_config(path)
    with HFTensors(path) as stored:
        tensors = PerExpertView(stored)
        cfg = grove_config_from_hf(hf_config, tensors)
        dtype = stored.dtype_name("model.embed_tokens.weight")
        if dtype not in _DTYPE_NAMES:
            raise HFFormatError(f"{path}: weights of dtype {dtype} are not supported "
                                "(allowed: F32, BF16)")
        cfg.runtime.dtype = _DTYPE_NAMES[dtype]
        if (path / "tokenizer.json").is_file():
            cfg.data.tokenizer = str(path.resolve())
        state = hf_to_megatron(tensors, cfg, progress)
    return cfg, state


def save_hf_checkpoint(output: str | Path, cfg: GroveConfig, state: Mapping[str, torch.Tensor],
                       tokenizer_dir: str | Path | None = None,
                       max_shard_bytes: int = 5 * 2 ** 30,
                       progress: Callable[[Iterator], Iterator] = iter,
                       flavour: str = "default") -> None:
    """Write the global Megatron state dict as a HF checkpoint folder (Llama / Qwen3 /
    Qwen3-MoE / GroveMoE, see :func:`hf_config_from_grove`; ``flavour`` ``release``: the
    released GroveMoE code's format), tensors in their own dtype. A GroveMoE export in the
    default flavour carries our modelling code (:mod:`.remote_code`). A Grove model trained
    without a bias (``moe.bias_update_rule=none``) is written with a zero ``mlp.expert_bias``."""
    from megatron_grove.hf_conversion import remote_code

    state = dict(state)
    e = cfg.moe
    biases = [f"decoder.layers.{i}.mlp.router.expert_bias"
              for i in range(e.first_k_dense_layers, cfg.model.num_layers)] if e.num_experts else []
    if e.num_experts and not e.num_expert_groups:
        for name in [n for n in biases if n in state]:
            if torch.count_nonzero(state.pop(name)) and e.expert_bias_in_selection:
                raise HFFormatError(f"{name} is non-zero but Qwen3-MoE has no expert bias; the "
                                    "model cannot be written exactly in the Qwen3-MoE format")
    elif e.num_expert_groups:
        for name in biases:
            state.setdefault(name, torch.zeros(e.num_experts, dtype=torch.float32))
    hf_state = megatron_to_hf(state, cfg, progress)
    dtype = "bfloat16" if cfg.runtime.dtype == "bf16" else "float32"
    config = hf_config_from_grove(cfg, dtype, flavour)
    extra = remote_code.REMOTE_CODE_FILES if "auto_map" in config else ()
    write_hf_checkpoint(output, config, hf_state, max_shard_bytes, tokenizer_dir,
                        extra_files={name: remote_code.source(name) for name in extra})


def load_megatron_state(path: str | Path) -> tuple[GroveConfig, dict[str, torch.Tensor]]:
    """The config and global state dict of the checkpoint at ``path`` (any saved layout).
    Call it in :func:`~megatron_grove.runtime.single_process_world`."""
    router_type = config_from_dict(read_checkpoint_config(path)).moe.router_type
    if router_type.startswith("cmoe"):
        raise HFFormatError(
            f"{path}: a CMoE checkpoint (moe.router_type={router_type}) has no Hugging Face "
            "counterpart "
            "to convert to; it loads as it is at any TP/EP layout (checkpoint.load=, "
            "tools/evaluate.py); tools/carve_cmoe.py writes its HF-style export at carving time")
    cfg, model = load_megatron_model(path)
    return cfg, model_state_dict(model, cfg)

