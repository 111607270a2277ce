"""GroveMoE Hugging Face exports, read by stock ``transformers`` through the modelling code they
carry (``trust_remote_code``): our evaluator's perplexity (fp32, 1e-5) for every Grove config
family of configs/ (reduced width), softmax and sigmoid weights, a non-zero expert bias in or
out of selection, unnormalised weights, a dense first layer; bit-identical round trips that
evaluate identically; ``generate()`` with a KV cache."""

import json

import numpy as np
import pytest
import torch

from config_builders import grove_family_config
from megatron_grove.evaluation import window_perplexity
from megatron_grove.hf_conversion import load_hf_checkpoint, save_hf_checkpoint
from processes import in_world
from tiny_models import random_model_state_here

SEQ = 32
ROUTING = ("router_score_function", "norm_topk_prob", "expert_bias_in_selection")
# id: (config family, overrides); every case has a random non-zero expert bias
CASES = {
    "tiny_cpu": ("tiny_cpu", []),
    "tiny_cpu-sigmoid-first-layer-dense": (
        "tiny_cpu", ["moe.router_score_function=sigmoid", "moe.first_k_dense_layers=1"]),
    "tiny_cpu-unnormalised": ("tiny_cpu", ["moe.norm_topk_prob=false"]),
    "tiny_cpu-sigmoid-unnormalised-bias-not-selecting": (
        "tiny_cpu", ["moe.router_score_function=sigmoid", "moe.norm_topk_prob=false",
                     "moe.expert_bias_in_selection=false"]),
    "grovemoe_33b_a3b": ("grovemoe_33b_a3b", []),
    "grovemoe_33b_a3b-sigmoid": ("grovemoe_33b_a3b", ["moe.router_score_function=sigmoid"]),
    "grovemoe_33b_g16": ("grovemoe_33b_g16", []),
}


def tokens_for(cfg, count: int = 4 * SEQ + 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.model.vocab_size, count).astype(np.int64)


def _export_and_evaluate(cfg, seed: int, folder, tokens):
    """In one world: random weights (non-zero bias), the HF export, its import, and our
    evaluator's perplexity of both."""
    from megatron_grove.evaluation import perplexity
    from megatron_grove.checkpointing.model_io import build_model, load_state_into_model

    state = random_model_state_here(cfg, seed)
    save_hf_checkpoint(folder, cfg, state)
    back_cfg, back_state = load_hf_checkpoint(folder)
    ppl = []
    for c, s in ((cfg, state), (back_cfg, back_state)):
        model = build_model(c)
        load_state_into_model(model, c, s)
        ppl.append(perplexity(model, tokens, SEQ, c.model.vocab_size, progress=False).ppl)
    return state, back_cfg, back_state, ppl


def load_with_transformers(folder):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        folder, trust_remote_code=True, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


# the quick tier keeps the tiny family's cases (both routers); the rest run with the e2e tier
SLOW = {"tiny_cpu-sigmoid-unnormalised-bias-not-selecting", "grovemoe_33b_a3b",
        "grovemoe_33b_a3b-sigmoid", "grovemoe_33b_g16"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.e2e) if c in SLOW else c
                                  for c in CASES])
def test_export_matches_our_evaluator_and_round_trips(case, tmp_path):
    family, overrides = CASES[case]
    cfg = grove_family_config(family, *overrides)
    tokens = tokens_for(cfg)
    state, back_cfg, back_state, (ours, ours_back) = in_world(
        _export_and_evaluate, cfg, len(case), tmp_path / "hf", tokens)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "grove_moe" and "AutoModelForCausalLM" in config["auto_map"]
    assert (config["scoring_func"], config["norm_topk_prob"], config["expert_bias_in_selection"]
            ) == tuple(getattr(cfg.moe, k) for k in ROUTING)

    assert back_state.keys() == state.keys()
    assert all(torch.equal(back_state[n], state[n]) for n in state), "round trip not bitwise"
    assert [getattr(back_cfg.moe, k) for k in ROUTING] == [getattr(cfg.moe, k) for k in ROUTING]
    assert ours_back == ours  # the same weights and routing evaluate identically
    hf_model = load_with_transformers(tmp_path / "hf")
    theirs = window_perplexity(lambda ids: hf_model(ids, use_cache=False).logits, tokens, SEQ).ppl
    assert theirs == pytest.approx(ours, rel=1e-5)


def _export_and_our_greedy(cfg, folder, prompt, new_tokens):
    """In one world: random weights (non-zero bias), the HF export, and our model's greedy
    tokens after ``prompt``."""
    from megatron_grove.model import gpt_logits
    from megatron_grove.generation import Sampling, generate_with_logits
    from megatron_grove.checkpointing.model_io import build_model, load_state_into_model

    state = random_model_state_here(cfg, seed=3)
    save_hf_checkpoint(folder, cfg, state)
    model = build_model(cfg).eval()
    load_state_into_model(model, cfg, state)
    return generate_with_logits(lambda ids: gpt_logits(model, ids, cfg.model.vocab_size),
                                prompt, Sampling(max_new_tokens=new_tokens), cfg.model.seq_length)


@pytest.mark.e2e
@pytest.mark.parametrize("score_function", ("softmax", "sigmoid"))
def test_generate_with_kv_cache_equals_our_greedy_tokens(score_function, tmp_path):
    cfg = grove_family_config("tiny_cpu", f"moe.router_score_function={score_function}")
    prompt = tokens_for(cfg, 12, seed=1).tolist()
    ours = in_world(_export_and_our_greedy, cfg, tmp_path / "hf", prompt, 16)
    model = load_with_transformers(tmp_path / "hf")
    lengths = []
    model.model.embed_tokens.register_forward_hook(
        lambda module, args, out: lengths.append(args[0].shape[1]))
    ids = torch.tensor([prompt])
    cached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=True)[0, 12:]
    assert lengths[0] == 12 and set(lengths[1:]) == {1}, "generate() did not use the KV cache"
    uncached = model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)[0, 12:]
    assert cached.tolist() == uncached.tolist() == ours
