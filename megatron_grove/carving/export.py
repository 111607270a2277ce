"""Writing a carved model, whatever the method: its run config and a model-only Megatron
checkpoint our trainer loads (with ``config.yaml`` to fine-tune it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import yaml

from megatron_grove.checkpointing.model_io import save_megatron_checkpoint
from megatron_grove.config import GroveConfig, MoEConfig, config_from_dict, config_to_dict
from megatron_grove.hf_conversion.tensor_mapping import hf_to_megatron
from megatron_grove.runtime import single_process_world

__all__ = ["carved_run_config", "write_megatron_checkpoint", "write_run_config"]

def carved_run_config(dense: GroveConfig, moe: MoEConfig, seq_length: int,
                      tokenizer_dir: str) -> GroveConfig:
    """Our run config of a carved model: the dense model's (``moe.num_experts == 0``, e.g.
    :func:`~megatron_grove.hf_conversion.hf_config.grove_config_from_hf`) with the method's
    ``moe`` section, EP = 1, ``seq_length`` and the tokenizer folder; validated."""
    cfg = copy.deepcopy(dense)
    cfg.model.seq_length = seq_length
    cfg.moe = moe
    cfg.parallel.expert_model_parallel_size = 1
    cfg.data.tokenizer = tokenizer_dir
    return config_from_dict(config_to_dict(cfg))


def write_megatron_checkpoint(cfg: GroveConfig, dense_cfg: GroveConfig,
                              hf_state: dict[str, torch.Tensor], carved: list, folder: Path,
                              to_megatron: Callable[..., dict[str, torch.Tensor]]) -> None:
    """The carved model (config ``cfg``) as a model-only Megatron checkpoint in ``folder``: the
    dense tensors through the HF -> Megatron mapping of the dense model ``dense_cfg``, every FFN
    replaced by ``to_megatron(carved[i], prefix)`` (the method's ``layer_to_megatron``)."""
    state = {name: tensor for name, tensor in hf_to_megatron(hf_state, dense_cfg).items()
             if ".mlp." not in name}
    for i, ffn in enumerate(carved):
        state.update(to_megatron(ffn, f"decoder.layers.{i}.mlp."))
    with single_process_world():
        save_megatron_checkpoint(folder, cfg, state)


def write_run_config(cfg: GroveConfig, folder: Path) -> None:
    """``folder/config.yaml``: the run config to fine-tune the carved model with."""
    (folder / "config.yaml").write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

