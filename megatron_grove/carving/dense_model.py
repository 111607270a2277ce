"""The dense model a carving starts from: read it (an HF folder or a ``.gguf`` file, never
converted to disk), build the ``transformers`` model from its tensors, and run the calibration
forward that records every FFN's inputs and hidden activations.

:func:`dense_model` builds the model on the meta device and assigns the tensors (no allocation,
no random initialisation, no copy); :func:`calibration_activations` runs it once over all
calibration windows (one batch, no LM head) and records each decoder layer's FFN input ``x``
(``[T, H]``, after the pre-FFN norm) and hidden activations ``h = silu(x W_g^T) * (x W_u^T)``
(``[T, d_ffn]``, the down projection's input).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from megatron_grove.data import embedded_train_files
from megatron_grove.data.tokenizer import copy_tokenizer_files
from megatron_grove.hf_conversion.gguf import GGUFFile, gguf_tokenizer, read_gguf_llama
from megatron_grove.hf_conversion.safetensors_io import HFTensors, read_hf_config

__all__ = ["read_dense", "dense_model", "calibration_token_windows", "default_calibration_text",
           "calibration_activations", "calibrate"]

_CUT_MARGIN = 64  # tokens dropped before the cut of a text prefix (its last words may merge on)


def read_dense(model: Path, tokenizer_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(HF config dict, fp32 state dict) of a ``.gguf`` file or an HF folder; the tokenizer's
    files go to ``tokenizer_dir``."""
    if model.suffix == ".gguf":
        reader = GGUFFile(model)
        gguf_tokenizer(reader).save_pretrained(str(tokenizer_dir))
        return read_gguf_llama(reader)
    copy_tokenizer_files(model, tokenizer_dir)
    with HFTensors(model) as tensors:
        return read_hf_config(model), {name: tensors[name].float() for name in tensors}


def _rebuild_meta_buffers(model: torch.nn.Module) -> None:
    """Rebuild, on the CPU, the modules whose non-persistent buffers (rotary ``inv_freq``: not
    in a state dict) are still on the meta device; they are built from their own config."""
    for name, module in list(model.named_modules()):
        if any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            if not hasattr(module, "config"):
                raise ValueError(f"dense model: {name} ({type(module).__name__}) holds a "
                                 "computed buffer and no config to rebuild it from")
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, type(module)(config=module.config))


def dense_model(hf_config: dict, hf_state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The dense Hugging Face causal LM of ``hf_config`` (a ``config.json`` dict) holding
    ``hf_state`` (fp32 tensors, used in place; eval mode)."""
    config = AutoConfig.for_model(**{k: v for k, v in hf_config.items() if k != "torch_dtype"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(hf_state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise ValueError(f"dense model: tensors missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} for a {hf_config.get('model_type')} config")
    model.tie_weights()
    _rebuild_meta_buffers(model)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("dense model: lm_head.weight is missing and the config does not tie "
                         "it to the embeddings")
    return model.eval()


def calibration_token_windows(tokenizer, text: str, tokens: int, window: int) -> torch.Tensor:
    """The first ``tokens`` tokens of ``text`` as ``[tokens // window, window]`` ids.

    Tokenises a growing prefix of ``text`` (the whole text only when needed), keeping tokens
    at least ``_CUT_MARGIN`` tokens before the cut: the ids of the whole text's tokenisation."""
    chars = 8 * tokens
    while True:
        cut = chars < len(text)
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if not cut or len(ids) >= tokens + _CUT_MARGIN:
            break
        chars *= 2
    rows = min(tokens, len(ids)) // window
    if rows < 1:
        raise ValueError(f"calibration text has {len(ids)} tokens, fewer than one window "
                         f"({window}); give a longer --calibration file or a smaller --window")
    return torch.tensor(ids[:rows * window]).reshape(rows, window)


def default_calibration_text() -> str:
    """The embedded training plays, concatenated."""
    return "\n\n".join(Path(f).read_text() for f in embedded_train_files())


@torch.no_grad()
def calibration_activations(hf_model: torch.nn.Module, token_ids: torch.Tensor
                            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``token_ids`` ``[B, S]`` through a dense HF causal LM's decoder (one batch, no LM head)
    -> (each layer's FFN input ``[B * S, H]``, each layer's hidden activations
    ``[B * S, d_ffn]``), fp32, in layer order."""
    layers = hf_model.model.layers
    inputs: list[torch.Tensor] = [None] * len(layers)
    hidden: list[torch.Tensor] = [None] * len(layers)

    def keep(store: list, i: int):
        def hook(_module, args):
            store[i] = args[0].reshape(-1, args[0].shape[-1]).float()
        return hook

    hooks = [hook for i, layer in enumerate(layers)
             for hook in (layer.mlp.register_forward_pre_hook(keep(inputs, i)),
                          layer.mlp.down_proj.register_forward_pre_hook(keep(hidden, i)))]
    try:
        hf_model.model(input_ids=token_ids, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return inputs, hidden


def calibrate(tokenizer, calibration: str | None, tokens: int, window: int, hf_config: dict,
              hf_state: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's FFN inputs ``[T, H]`` and hidden activations ``[T, d_ffn]`` of the dense
    model ``hf_config`` / ``hf_state`` on the first ``tokens`` tokens (in windows of
    ``window``) of the text file ``calibration`` (None: the embedded training corpus)."""
    text = Path(calibration).read_text() if calibration else default_calibration_text()
    windows = calibration_token_windows(tokenizer, text, tokens, window)
    return calibration_activations(dense_model(hf_config, hf_state), windows)
