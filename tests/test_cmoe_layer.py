"""The carved FFN as a Megatron MoELayer with a CMoE router (CMoELinearRouter or the paper's
CMoERouter) + Megatron's shared expert (CPU, fp32, gloo): against the plain-torch reference
(outputs and gradients), EP=1 vs EP=2, the all-experts-active invariant, the config wiring
and the router's saved state."""

from __future__ import annotations

import dataclasses
import functools
import pickle

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.moe_layer import MoELayer

from carving_reference import carved_ffn_forward, swiglu
from config_builders import transformer_config
from megatron_grove.carving.cmoe import carve_ffn
from megatron_grove.carving.weights import carved_ffn_to_megatron
from megatron_grove.config import ConfigError, load_config
from megatron_grove.megatron_config import to_transformer_config
from megatron_grove.moe import build_moe_layer
from processes import run_distributed

HIDDEN, D_FFN, TOKENS = 16, 44, 24  # 44 % 8 != 0: four zero-padded neurons


@functools.cache
def carved_case(shared: int, experts: int, router: str = "linear"):
    g = torch.Generator().manual_seed(experts + shared)
    w_g, w_u = (torch.randn(D_FFN, HIDDEN, generator=g) / 4 for _ in range(2))
    w_d = torch.randn(HIDDEN, D_FFN, generator=g) / 6
    x = torch.randn(TOKENS, HIDDEN, generator=g)
    carved = carve_ffn(w_g, w_u, w_d, x, shared, experts, activation_topk=11, router=router)
    routed = experts - shared
    scale = 0.5 * torch.randn(routed, generator=g)
    bias = 0.1 * torch.randn(routed, generator=g)
    return (w_g, w_u, w_d), carved, x, scale, bias, torch.randn(TOKENS, HIDDEN, generator=g)


def build_layer(shared: int, experts: int, topk: int, m: int, ep: int,
                router: str = "linear") -> MoELayer:
    """The carved FFN's MoE layer (Megatron's ``MoELayer`` with a CMoE router and a shared
    expert), through the config path and :func:`megatron_grove.moe.build_moe_layer`."""
    return build_moe_layer(transformer_config(
        model__num_layers=1, model__hidden_size=HIDDEN, model__num_attention_heads=1,
        model__ffn_hidden_size=D_FFN, moe__num_experts=experts - shared, moe__ffn_hidden_size=m,
        moe__router_topk=topk, moe__num_expert_groups=0,
        moe__router_type="cmoe" if router == "paper" else "cmoe_linear",
        moe__bias_update_rule="paper",
        moe__shared_expert_ffn_hidden_size=shared * m if shared else "null",
        parallel__expert_model_parallel_size=ep))


def worker(rank: int, shared: int, experts: int, topk: int, router: str) -> bytes:
    ep = parallel_state.get_expert_model_parallel_world_size()
    _, carved, x, scale, bias, cotangent = carved_case(shared, experts, router)
    m = carved.expert_gate.shape[1]
    layer = build_layer(shared, experts, topk, m, ep, router)
    state = carved_ffn_to_megatron(carved, "", scale=scale, bias=bias)
    per_rank = (experts - shared) // ep
    local = {}
    for name, value in state.items():
        if name.startswith("experts.local_experts."):
            e = int(name.split(".")[2])
            if e // per_rank != rank:
                continue
            name = name.replace(f"local_experts.{e}.", f"local_experts.{e % per_rank}.")
        local[name] = value
    missing, unexpected = layer.load_state_dict(local, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)
    rows = slice(rank * TOKENS // ep, (rank + 1) * TOKENS // ep)
    xs = x[rows].clone().unsqueeze(1).requires_grad_()
    y, _ = layer(xs)
    (y.squeeze(1) * cotangent[rows]).sum().backward()
    return pickle.dumps({"y": y.detach().squeeze(1), "x_grad": xs.grad.squeeze(1),
                         "scale_grad": layer.router.expert_scale.grad.clone(),
                         "router_grad": layer.router.weight.grad.clone(),
                         "tokens": layer.router.local_tokens_per_expert.clone()})


def run_layer(shared: int, experts: int, topk: int, ep: int, router: str = "linear") -> dict:
    results = [pickle.loads(r) for r in run_distributed(
        worker, world_size=ep, expert_parallel=ep, args=(shared, experts, topk, router))]
    return {"y": torch.cat([r["y"] for r in results]),
            "x_grad": torch.cat([r["x_grad"] for r in results]),
            "scale_grad": sum(r["scale_grad"] for r in results),
            "router_grad": sum(r["router_grad"] for r in results),
            "tokens": sum(r["tokens"] for r in results)}


def reference(shared: int, experts: int, topk: int, router: str = "linear") -> dict:
    _, carved, x, scale, bias, cotangent = carved_case(shared, experts, router)
    carved = dataclasses.replace(carved,
                                 router_weight=carved.router_weight.clone().requires_grad_())
    x = x.clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    y = carved_ffn_forward(carved, x, topk, scale=scale, bias=bias)
    (y * cotangent).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "scale_grad": scale.grad,
            "router_grad": carved.router_weight.grad}


@pytest.mark.parametrize("shared,experts,topk,router", [
    (3, 8, 3, "linear"), (1, 4, 1, "linear"), (0, 4, 2, "linear"), (3, 8, 3, "paper"),
    (0, 4, 2, "paper")])
def test_layer_matches_reference_outputs_and_gradients(shared, experts, topk, router):
    got = run_layer(shared, experts, topk, ep=1, router=router)
    want = reference(shared, experts, topk, router)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=key)
    assert float(got["tokens"].sum()) == TOKENS * topk  # counted for the balancing bias


def test_expert_parallel_matches_ep1():
    ep1, ep2 = run_layer(2, 8, 3, ep=1), run_layer(2, 8, 3, ep=2)
    for key in ep1:
        torch.testing.assert_close(ep2[key], ep1[key], rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("router", ["linear", "paper"])
def test_all_experts_active_at_carving_is_the_dense_ffn(router):
    (w_g, w_u, w_d), carved, x, _, _, _ = carved_case(2, 8, router)
    layer_out = run_layer_fresh(carved, x)
    torch.testing.assert_close(layer_out, swiglu(x, w_g, w_u, w_d), rtol=1e-5, atol=1e-5)


def _fresh_worker(rank: int, carved, x) -> torch.Tensor:
    m, routed = carved.expert_gate.shape[1], carved.num_routed
    layer = build_layer(8 - routed, 8, routed, m, ep=1, router=carved.router)
    missing, unexpected = layer.load_state_dict(carved_ffn_to_megatron(carved, ""), strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)
    with torch.no_grad():
        return layer(x.unsqueeze(1))[0].squeeze(1)


def run_layer_fresh(carved, x) -> torch.Tensor:
    return run_distributed(_fresh_worker, world_size=1, expert_parallel=1, args=(carved, x))[0]


def test_router_state_is_saved():
    def capture(rank):
        return [sorted(k for k in build_layer(3, 8, 3, 4, ep=1, router=router).state_dict()
                       if k.startswith("router.")) for router in ("paper", "linear")]

    paper, linear = run_distributed(capture, world_size=1, expert_parallel=1)[0]
    assert paper == ["router.expert_bias", "router.expert_scale", "router.up_weight",
                     "router.weight"]
    assert linear == ["router.expert_bias", "router.expert_scale", "router.score_bias",
                      "router.weight"]


def test_config_selects_cmoe_and_rejects_what_cmoe_lacks():
    cfg = load_config(None, ["moe.router_type=cmoe", "moe.num_experts=5", "moe.router_topk=1",
                             "moe.shared_expert_ffn_hidden_size=96", "moe.num_expert_groups=0"])
    tconfig = to_transformer_config(cfg)
    assert tconfig.moe_router_type == "cmoe"
    assert tconfig.moe_shared_expert_intermediate_size == 96
    with pytest.raises(ConfigError, match="moe.router_type=cmoe"):
        load_config(None, ["moe.router_type=cmoe", "moe.aux_loss_coeff=0.01"])
    with pytest.raises(ConfigError, match="moe.router_type=cmoe_linear"):
        load_config(None, ["moe.router_type=cmoe_linear", "moe.aux_loss_coeff=0.01"])


def _trainable_names(rank: int, trainable: str, router_type: str = "cmoe") -> list[str]:
    from megatron_grove.model import build_gpt_model
    from megatron_grove.training import freeze_untrainable

    cfg = load_config(None, [f"moe.router_type={router_type}", "moe.num_experts=4",
                             "moe.router_topk=2",
                             "moe.shared_expert_ffn_hidden_size=64", "moe.num_expert_groups=0",
                             "model.num_layers=1", "model.qk_layernorm=false"])
    model = build_gpt_model(to_transformer_config(cfg), 256, 16)
    freeze_untrainable([model], trainable)
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_trainable_router_freezes_everything_but_the_routers():
    names = run_distributed(_trainable_names, world_size=1, args=("router",))[0]
    assert names == ["decoder.layers.0.mlp.router.expert_scale",
                     "decoder.layers.0.mlp.router.up_weight", "decoder.layers.0.mlp.router.weight"]
    linear = run_distributed(_trainable_names, world_size=1, args=("router", "cmoe_linear"))[0]
    assert linear == ["decoder.layers.0.mlp.router.expert_scale",
                      "decoder.layers.0.mlp.router.score_bias",
                      "decoder.layers.0.mlp.router.weight"]
    everything = run_distributed(_trainable_names, world_size=1, args=("all",))[0]
    assert len(everything) > 10 and set(names) < set(everything)


def test_embedded_corpus_is_tokenised_with_the_configured_tokenizer(monkeypatch):
    from megatron_grove.training import data as training_data

    seen = {}
    monkeypatch.setattr(training_data, "embedded_corpus_prefix",
                        lambda tokenizer=None: seen.setdefault("tokenizer", tokenizer) and "p")
    monkeypatch.setattr(training_data, "check_sources", lambda *a, **k: None)
    marker = object()
    assert training_data.resolve_sources(load_config(None), marker)[0] == (["p"], None)
    assert seen["tokenizer"] is marker
