"""Hugging Face <-> Megatron checkpoints for our models: dense Llama / Qwen3, Qwen3-MoE and
GroveMoE; the paper's upcycling.

One module per job:

* :mod:`.hf_config` — HF ``config.json`` <-> the ``model``/``moe`` sections of
  :class:`~megatron_grove.config.GroveConfig`;
* :mod:`.tensor_mapping` — tensor names/shapes, HF tensors <-> the *global Megatron state
  dict* (the ``state_dict()`` of our ``GPTModel`` at TP = EP = 1, no ``_extra_state``,
  vocabulary unpadded ``[V, H]``), with checks that name missing / extra / mis-shaped tensors;
* :mod:`.safetensors_io` — reading (lazily, index checked) and writing (sharded + index,
  atomic) HF folders;
* :mod:`.hf_checkpoint` — whole HF folders <-> (config, global state dict); a Megatron
  checkpoint's global state dict (our model <-> the state dict and model-only Megatron
  checkpoints are :mod:`megatron_grove.checkpointing.model_io`);
* :mod:`.gguf` — reading a ``.gguf`` Llama (the carving tools' other input format);
* :mod:`.upcycle` — MoE -> Grove MoE with the same function;
* :mod:`.packed_experts` — packed expert tensors (transformers 5's layout) read per expert;
* :mod:`.remote_code` — our GroveMoE modelling code for transformers 5, shipped in exports;
* :mod:`.runners` / :mod:`.verify` — a checkpoint's logits (transformers or our code) and the
  converter's ``--verify`` comparison.

Public functions (what the conversion tool and the evaluator call; ``save_megatron_checkpoint``,
``load_megatron_model``, ``build_model`` and ``load_state_into_model`` are
:mod:`megatron_grove.checkpointing.model_io`'s)::

    cfg, state = load_hf_checkpoint(hf_dir)          # GroveConfig + global state dict
    save_hf_checkpoint(out_dir, cfg, state, tokenizer_dir=..., flavour="default" | "release")
    with single_process_world():                     # megatron_grove.runtime
        save_megatron_checkpoint(out_dir, cfg, state)        # model-only, loadable at any TP/EP
        cfg, state = load_megatron_state(ckpt_dir)           # any saved layout -> global
        cfg, model = load_megatron_model(ckpt_dir)           # at the running world's layout
    cfg, state = upcycle_to_grove(cfg, state, num_groups, adjugate_ffn, lam, seed)
    model = build_model(cfg); load_state_into_model(model, cfg, state)

A Megatron checkpoint directory (written by the trainer or by ``save_megatron_checkpoint``)::

    latest_checkpointed_iteration.txt  -> iter_XXXXXXX/ (dist_checkpointing; common.pt holds
    train_state = {step, consumed_samples, scheduler (None: model only), config: the whole
    GroveConfig as a dict}); tokenizer/ (tokenizer.json, tokenizer_config.json, ...)

so ``config_from_dict(read_checkpoint_config(dir))`` rebuilds the model and
``checkpoint_tokenizer(dir)`` finds the tokenizer (both in :mod:`megatron_grove.checkpointing`).
``cfg.model.vocab_size`` is the true vocabulary; the model pads it as Megatron does and the
padded rows are zero (the evaluator drops their logits).
"""

from megatron_grove.hf_conversion.hf_checkpoint import (
    load_hf_checkpoint,
    load_megatron_state,
    save_hf_checkpoint,
)
from megatron_grove.hf_conversion.hf_config import HFFormatError, is_grove_checkpoint
from megatron_grove.hf_conversion.safetensors_io import is_hf_checkpoint
from megatron_grove.hf_conversion.upcycle import upcycle_to_grove

__all__ = ["load_hf_checkpoint", "save_hf_checkpoint", "HFFormatError", "is_grove_checkpoint",
           "is_hf_checkpoint", "load_megatron_state", "upcycle_to_grove"]
