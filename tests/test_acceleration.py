"""Kernels inside the model, and the kernels / TransformerEngine / FP8 configuration.

* the group-aware Grove layer (permute, unpermute and Grove combine kernels) with
  ``grove_kernels_backend=triton`` matches the plain-torch reference and the torch backend,
  at EP = 1 and 2 (Triton under ``TRITON_INTERPRET=1`` on CPU, see ``conftest.py``);
* a model built with the triton backend has the SwiGLU kernel module in every MLP and gives
  the torch backend's loss and gradients;
* TE / FP8 requests this machine cannot serve are one-line config errors (exit 2 in the CLI).
"""

import dataclasses
import pickle

import pytest
import torch

from grove_layer_cases import (
    ALL_KEYS,
    CASES,
    FORCED_NAMES,
    assert_matches,
    forced_run,
    grove_run,
    reference_of,
    run_layers,
)
from megatron_grove.config import ConfigError, load_config
from megatron_grove.megatron_config import to_transformer_config
from megatron_grove.model import build_gpt_model
from megatron_grove.runtime import acceleration
from megatron_grove.runtime.acceleration import megatron_fields, resolve_acceleration
from processes import ROOT, run_distributed, run_script


@pytest.mark.parametrize("ep", (1, 2))
def test_group_aware_layer_with_triton_kernels_matches_reference(ep):
    """Random routings and the forced ones (an EP rank that receives nothing, one group per
    token, uneven load)."""
    cases = [case for case in CASES if case.groups % ep == 0][:3]
    base_runs = ([grove_run(case, "grove_alltoall") for case in cases]
                 + [forced_run(name, "grove_alltoall") for name in FORCED_NAMES])
    runs = [dataclasses.replace(run, kernels_backend=backend)
            for backend in ("torch", "triton") for run in base_runs]
    results = run_layers(runs, ep=ep)
    torch_results, triton_results = results[:len(base_runs)], results[len(base_runs):]
    for run, with_torch, with_triton in zip(base_runs, torch_results, triton_results):
        assert_matches(with_triton, reference_of(run)[0], ALL_KEYS, rel=1e-5)
        assert_matches(with_triton, with_torch, ALL_KEYS, rel=1e-6)
        assert with_triton["counters"] == with_torch["counters"], run.case.id
    if ep == 2:  # rank_idle: EP rank 1 computed nothing
        idle = triton_results[len(cases) + FORCED_NAMES.index("rank_idle")]
        assert idle["rank_counters"][1]["routed_rows"] == 0


def _tiny_model_step(rank: int, backend: str) -> bytes:
    """Loss, gradients and activation modules of a 2-layer model (dense, then Grove MoE)."""
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32",
                             "model.num_attention_heads=2", "model.ffn_hidden_size=48",
                             "moe.first_k_dense_layers=1", "moe.num_experts=4",
                             "moe.num_expert_groups=2", "moe.ffn_hidden_size=16",
                             "moe.adjugate_ffn_hidden_size=8", "moe.adjugate_scale=0.5",
                             "moe.token_dispatcher_type=grove_alltoall",
                             f"kernels.backend={backend}", "runtime.device=cpu"])
    model = build_gpt_model(to_transformer_config(cfg, acceleration=resolve_acceleration(cfg)),
                            vocab_size=64, seq_length=8)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.triu(torch.ones(1, 1, 8, 8, dtype=torch.bool), diagonal=1)
    loss = model(tokens, torch.arange(8).expand(2, 8), mask, labels=tokens).mean()
    loss.backward()
    mlps = [layer.mlp for layer in model.decoder.layers]
    activations = [type(mlps[0].activation_func).__name__,
                   type(mlps[1].experts.local_experts[0].activation_func).__name__,
                   type(mlps[1].adjugate_experts.local_experts[0].activation_func).__name__]
    backends = {getattr(m, "backend", None) for m in model.modules() if hasattr(m, "backend")}
    return pickle.dumps({"loss": loss.item(), "activations": activations, "backends": backends,
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters()
                                   if p.grad is not None}})


def test_model_with_triton_kernels_matches_torch_backend():
    (with_torch,), (with_triton,) = (
        [pickle.loads(r) for r in run_distributed(_tiny_model_step, world_size=1,
                                                  args=(backend,))]
        for backend in ("torch", "triton"))
    assert with_triton["activations"] == ["SwiGLU"] * 3
    assert with_triton["backends"] == {"triton"}
    assert with_torch["activations"] == ["function"] * 3  # Megatron's own glu(F.silu)
    assert with_triton["loss"] == pytest.approx(with_torch["loss"], rel=1e-6)
    assert with_triton["grads"].keys() == with_torch["grads"].keys()
    for name, grad in with_torch["grads"].items():
        torch.testing.assert_close(with_triton["grads"][name], grad, rtol=1e-5, atol=1e-6,
                                   msg=name)


def test_backend_auto_is_torch_on_cpu_and_triton_needs_the_interpreter(monkeypatch):
    cfg = load_config(None, [])
    assert resolve_acceleration(cfg, "cpu").kernels_backend == "torch"
    assert resolve_acceleration(cfg, "cuda").kernels_backend == "triton"
    triton_cfg = load_config(None, ["kernels.backend=triton"])
    assert resolve_acceleration(triton_cfg, "cpu").kernels_backend == "triton"  # interpreter on
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ConfigError, match="kernels.backend=triton on CPU needs TRITON_INTERPRET=1"):
        resolve_acceleration(triton_cfg, "cpu")


@pytest.mark.parametrize("overrides,message", [
    (["precision.fp8=e4m3", "runtime.dtype=bf16"],
     "precision.fp8=e4m3 needs TransformerEngine on a GPU, but no GPU is in use"),
    (["precision.transformer_engine=true"],
     "precision.transformer_engine=true needs TransformerEngine on a GPU, but no GPU is in use"),
])
def test_transformer_engine_requests_without_gpu_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        resolve_acceleration(load_config(None, overrides), "cpu")
    with pytest.raises(ConfigError, match="but precision.transformer_engine=false"):
        resolve_acceleration(load_config(None, ["precision.fp8=e4m3", "runtime.dtype=bf16",
                                                "precision.transformer_engine=false"]), "cuda")


def test_fp8_maps_to_megatron_fields(monkeypatch):
    """With TE importable on a GPU (faked here), FP8 and the grouped-GEMM experts reach
    Megatron's config; FP8 also needs bf16."""
    monkeypatch.setattr(acceleration, "transformer_engine_available", lambda: True)
    with pytest.raises(ConfigError, match="precision.fp8=hybrid needs runtime.dtype=bf16"):
        resolve_acceleration(load_config(None, ["precision.fp8=hybrid"]), "cuda")
    for recipe, megatron_recipe, algo in (("delayed", "delayed", "max"),
                                          ("current", "tensorwise", "most_recent")):
        cfg = load_config(None, ["precision.fp8=hybrid", "runtime.dtype=bf16",
                                 f"precision.fp8_recipe={recipe}"])
        acc = resolve_acceleration(cfg, "cuda")
        assert (acc.transformer_engine, acc.fp8, acc.fp8_recipe) == (True, "hybrid",
                                                                     megatron_recipe)
        # (Megatron's TransformerConfig itself refuses fp8 without TE: checked on the fields)
        fields = megatron_fields(acc, cfg.precision)
        assert (fields["fp8"], fields["fp8_recipe"], fields["fp8_amax_compute_algo"]) == (
            "hybrid", megatron_recipe, algo)
        assert fields["moe_grouped_gemm"] and fields["grove_transformer_engine"]
        assert fields["use_te_activation_func"]  # auto on a GPU: the Triton SwiGLU module
    off = resolve_acceleration(load_config(None, ["precision.transformer_engine=false"]), "cuda")
    assert not off.transformer_engine and off.fp8 is None


@pytest.mark.e2e
def test_cli_fp8_without_gpu_is_one_line_exit_2():
    proc = run_script("launch/pretrain_grove.py", "--config",
                      str(ROOT / "configs" / "tiny_cpu.yaml"), "precision.fp8=e4m3",
                      "runtime.dtype=bf16", "runtime.device=cpu",
                      "parallel.expert_model_parallel_size=1", timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "pretrain_grove.py: config error: precision.fp8=e4m3 needs TransformerEngine on a GPU")
