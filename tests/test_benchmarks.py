"""benchmarks/kernels.py: without a GPU (hidden from its process) it says so and exits 0;
its kernel cases agree with their references (CPU, Triton's interpreter)."""

import pytest
import torch

from helpers import run_script
from megatron_grove.benchmarking.kernels import kernel_cases


@pytest.mark.e2e
def test_kernel_benchmark_without_gpu_says_so_and_exits_0():
    proc = run_script("benchmarks/kernels.py", timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.startswith("benchmarks/kernels.py needs a CUDA GPU (none found)")


@pytest.mark.e2e
def test_kernel_benchmark_help():
    proc = run_script("benchmarks/kernels.py", "--help", timeout=120)
    assert proc.returncode == 0
    for needle in ("--tokens", "--ep", "torch.compile", "33b"):
        assert needle in proc.stdout


def test_benchmark_cases_agree_with_their_references():
    """The benchmark's inputs at a small Grove layer (CPU: Triton's interpreter)."""
    from megatron_grove.config import load_config

    cfg = load_config(None, ["model.hidden_size=24", "moe.num_experts=8", "moe.num_expert_groups=4",
                             "moe.router_topk=3", "moe.ffn_hidden_size=12",
                             "moe.adjugate_ffn_hidden_size=4"])
    cases = kernel_cases(cfg, tokens=16, ep=2, dtype=torch.float32, device="cpu")
    assert len(cases) == 5
    for name, (reference, triton_fn, inputs) in cases.items():
        torch.testing.assert_close(triton_fn(*inputs), reference(*inputs), rtol=1e-5, atol=1e-5,
                                   msg=name)
