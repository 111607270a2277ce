"""Our Megatron model <-> its global state dict (the ``state_dict()`` of our ``GPTModel`` at
TP = EP = 1, no ``_extra_state``, vocabulary unpadded ``[V, H]``), and model-only Megatron
checkpoints (the trainer's format, :mod:`.checkpoint`): build, load, save.

A Megatron checkpoint is a dist_checkpointing folder: every tensor is stored with its global
shape and each rank's slice offsets, so a checkpoint written at one TP/EP layout loads at any
other (Megatron reshards on load). The converter writes from one process (TP = EP = 1); the
layout a later run uses is only its ``parallel`` config.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Mapping

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_grove.checkpointing.checkpoint import (
    CheckpointError,
    TrainState,
    checkpoint_tokenizer,
    load_checkpoint,
    read_checkpoint_config,
    resolve_checkpoint_folder,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_grove.config import GroveConfig, config_from_dict, config_to_dict
from megatron_grove.data.tokenizer import load_tokenizer
from megatron_grove.megatron_config import TORCH_DTYPES, to_transformer_config
from megatron_grove.model import build_gpt_model

__all__ = ["build_model", "model_state_dict", "load_state_into_model",
           "save_megatron_checkpoint", "load_megatron_model"]


def build_model(cfg: GroveConfig, dtype: torch.dtype | None = None, initialize: bool = False,
                device: torch.device | str = "cpu") -> GPTModel:
    """Our ``GPTModel`` for ``cfg`` at the running world's parallel layout, whatever
    ``cfg.parallel`` says (``cfg.runtime.dtype`` unless ``dtype``); ``initialize=False`` skips
    random initialisation (weights are loaded)."""
    dtype = dtype or TORCH_DTYPES[cfg.runtime.dtype]
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    p.tensor_model_parallel_size = parallel_state.get_tensor_model_parallel_world_size()
    p.expert_model_parallel_size = parallel_state.get_expert_model_parallel_world_size()
    p.pipeline_model_parallel_size = parallel_state.get_pipeline_model_parallel_world_size()
    p.virtual_pipeline_model_parallel_size = None  # tools build one chunk per rank
    if p.pipeline_model_parallel_size == 1:
        p.num_layers_in_first_pipeline_stage = p.num_layers_in_last_pipeline_stage = None
    p.sequence_parallel = p.tensor_model_parallel_size > 1 and cfg.moe.num_experts > 0
    tconfig = to_transformer_config(cfg, dtype, use_cpu_initialization=True)
    tconfig.perform_initialization = initialize
    model = build_gpt_model(tconfig, cfg.model.vocab_size, cfg.model.seq_length,
                            cfg.model.rotary_base, cfg.model.tie_embeddings, seed=cfg.train.seed)
    return model.to(device)


def _vocab_tensors(cfg: GroveConfig) -> list[str]:
    names = ["embedding.word_embeddings.weight"]
    return names if cfg.model.tie_embeddings else names + ["output_layer.weight"]


def model_state_dict(model: GPTModel, cfg: GroveConfig) -> dict[str, torch.Tensor]:
    """The global state dict (one process, TP = EP = 1): no ``_extra_state``, unpadded vocab."""
    out = {name: t.detach() for name, t in model.state_dict().items()
           if not name.endswith("_extra_state") and t is not None}
    if cfg.model.tie_embeddings:
        out.pop("output_layer.weight", None)
    for name in _vocab_tensors(cfg):
        out[name] = out[name][:cfg.model.vocab_size]
    return out


def load_state_into_model(model: GPTModel, cfg: GroveConfig,
                          state: Mapping[str, torch.Tensor]) -> None:
    """Copy a global state dict (unpadded vocab) into ``model`` (TP = EP = 1); the padded
    vocabulary rows are zero. Every parameter and buffer must be given, nothing else."""
    own = {name: t for name, t in model.state_dict().items()
           if not name.endswith("_extra_state") and t is not None}
    if cfg.model.tie_embeddings:
        own.pop("output_layer.weight", None)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"state dict does not match the model: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    with torch.no_grad():
        for name, target in own.items():
            source = state[name]
            if name in _vocab_tensors(cfg):
                target.zero_()
                target[:source.shape[0]].copy_(source)
            elif tuple(source.shape) != tuple(target.shape):
                raise ValueError(f"{name}: shape {tuple(source.shape)}, the model has "
                                 f"{tuple(target.shape)}")
            else:
                target.copy_(source)


def save_megatron_checkpoint(output: str | Path, cfg: GroveConfig,
                             state: Mapping[str, torch.Tensor]) -> Path:
    """Write ``state`` (global, unpadded) as a model-only Megatron checkpoint under ``output``
    (step 0; ``cfg`` stored; ``cfg.data.tokenizer``'s files copied into ``tokenizer/``).
    Collective inside a world; call it in :func:`~megatron_grove.runtime.single_process_world`."""
    model = build_model(cfg)
    load_state_into_model(model, cfg, state)
    return save_checkpoint(output, model, None,
                           TrainState(step=0, consumed_samples=0, scheduler=None,
                                      config=config_to_dict(cfg)))


def load_megatron_model(path: str | Path, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> tuple[GroveConfig, GPTModel]:
    """Build the model stored at ``path`` (root or ``iter_*`` folder) at the current parallel
    layout and load its weights (Megatron reshards from the saved layout), after checking the
    files against the checkpoint's manifest. A checkpoint trained with ``model.vocab_size``
    unset gets the vocabulary size of the tokenizer it carries."""
    folder = resolve_checkpoint_folder(path)
    warning = verify_checkpoint(folder)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    cfg = config_from_dict(read_checkpoint_config(folder))
    if cfg.model.vocab_size is None:
        tokenizer = checkpoint_tokenizer(folder)
        if tokenizer is None:
            raise CheckpointError(f"{folder}: model.vocab_size is unset in its config and it "
                                  "carries no tokenizer/ to take it from")
        cfg.model.vocab_size = load_tokenizer(tokenizer).vocab_size
    model = build_model(cfg, dtype=dtype, device=device)
    load_checkpoint(folder, model, None, verify=False)
    return cfg, model

