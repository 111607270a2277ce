"""benchmarks/kernels.py: on a machine without a GPU it says so and exits 0."""

import importlib.util

import pytest
import torch

from _scripts import ROOT, run_script


@pytest.mark.skipif(torch.cuda.is_available(), reason="behaviour without a GPU")
def test_kernel_benchmark_without_gpu_says_so_and_exits_0():
    proc = run_script("benchmarks/kernels.py", timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.startswith("benchmarks/kernels.py needs a CUDA GPU (none found)")


def test_kernel_benchmark_help():
    proc = run_script("benchmarks/kernels.py", "--help", timeout=120)
    assert proc.returncode == 0
    for needle in ("--tokens", "--ep", "torch.compile", "33b"):
        assert needle in proc.stdout


def test_benchmark_cases_agree_with_their_references():
    """The benchmark's inputs at a small Grove layer (CPU: Triton's interpreter)."""
    from megatron_grove.config import load_config

    spec = importlib.util.spec_from_file_location("kernels_benchmark", ROOT / "benchmarks" / "kernels.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(None, ["model.hidden_size=24", "moe.num_experts=8", "moe.num_expert_groups=4",
                             "moe.router_topk=3", "moe.ffn_hidden_size=12",
                             "moe.adjugate_ffn_hidden_size=4"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = bench._cases(cfg, tokens=16, ep=2, dtype=torch.float32, device=device)
    assert len(cases) == 5
    for name, (reference, triton_fn, inputs) in cases.items():
        torch.testing.assert_close(triton_fn(*inputs), reference(*inputs), rtol=1e-5, atol=1e-5,
                                   msg=name)
