"""benchmarks/kernels.py: without a GPU (hidden from its process) it says so and exits 0;
its kernel cases agree with their references (CPU, Triton's interpreter).
benchmarks/train_step.py: the three variants' whole training steps, interleaved, on gloo.
benchmarks/gpu_check.py (scripts/gpu_check.sh): the wheels check, the steps' budget, --plan."""

import json

import pytest
import torch

from processes import FAST, ROOT, TINY, run_script
from benchmarks.gpu_check_steps import (
    BUDGET_S,
    REQUIRED_WHEELS,
    WHEELS_LIMIT_BYTES,
    check_wheels,
    gpu_steps,
)
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


# --------------------------------------------------------------------------------------
# benchmarks/train_step.py
# --------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_train_step_benchmark_json():
    """Two steps of each variant (one warm-up) of the tiny model at EP=2: the JSON has every
    variant's median step time, spread and ratios; (b) and (c) train the same model (equal
    losses); (c) sends at most one copy per (token, EP rank), (b) one per expert and group."""
    proc = run_script("benchmarks/train_step.py", "--config", str(TINY), *FAST,
                      "--ep", "2", "--steps", "2", "--warmup", "1", "--json", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    variants = {"plain", "virtual", "group_aware", "hierarchical"}
    assert set(out["step_time_s"]) == set(out["step_time_spread_s"]) == variants
    assert all(len(times) == 2 for times in out["step_times_s"].values())
    for v in variants:
        low, high = out["step_time_spread_s"][v]
        assert 0 < low <= out["step_time_s"][v] <= high
    assert out["ratio_group_aware_vs_virtual"] == pytest.approx(
        out["step_time_s"]["group_aware"] / out["step_time_s"]["virtual"])
    assert out["ratio_group_aware_vs_plain"] == pytest.approx(
        out["step_time_s"]["group_aware"] / out["step_time_s"]["plain"])
    assert all(len(losses) == 3 for losses in out["losses"].values())  # warm-up included
    assert out["loss_max_abs_diff_virtual_vs_group_aware"] <= 1e-5
    assert out["losses"]["plain"] != out["losses"]["virtual"]  # no adjugates: another model
    copies = out["copies_per_token"]
    assert 1 <= copies["group_aware"] <= 2
    assert copies["virtual"] == pytest.approx(2 + out["adjugate_evals_per_token"]["virtual"])
    assert out["adjugate_evals_per_token"]["group_aware"] == pytest.approx(
        out["adjugate_evals_per_token"]["virtual"])


@pytest.mark.e2e
def test_train_step_benchmark_refuses_a_plain_moe():
    proc = run_script("benchmarks/train_step.py", "--config", str(TINY),
                      "moe.num_expert_groups=0", timeout=120)
    assert proc.returncode == 2
    assert "the benchmark compares Grove MoE layers; set both > 0" in proc.stderr


# --------------------------------------------------------------------------------------
# the GPU check
# --------------------------------------------------------------------------------------


def test_gpu_check_steps_fit_the_budget():
    steps = gpu_steps()
    assert sum(step.timeout_s for step in steps) <= BUDGET_S == 480
    assert [s.name for s in steps][:1] == ["gpu_tests"]
    for step in steps:  # every script and config a step names is in the checkout
        for part in step.command:
            if part.endswith((".py", ".yaml")):
                assert (ROOT / part).is_file(), (step.name, part)


def test_wheels_check_names_what_would_stop_the_install(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "megatron_core-0.19.2-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
     ).write_bytes(b"x" * 10)
    (good / "tokenizers-0.22.1-cp39-abi3-manylinux_2_17_x86_64.whl").write_bytes(b"x")
    (good / "tqdm-4.67.1-py3-none-any.whl").write_bytes(b"x")
    report = check_wheels(good)
    assert report["problems"] == [] and report["total_bytes"] == 12
    assert REQUIRED_WHEELS == ("megatron-core",)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "megatron_core-0.19.2-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"x")
    (bad / "megatron_core-0.19.1-cp312-cp312-macosx_11_0_arm64.whl").write_bytes(b"x")
    (bad / "torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(
        b"x" * (WHEELS_LIMIT_BYTES + 1))
    (bad / "notes.whl").write_bytes(b"x")
    problems = check_wheels(bad)["problems"]
    assert any("built for cp311, not cp312" in p for p in problems)
    assert any("platform macosx_11_0_arm64" in p for p in problems)
    assert any("megatron-core: two versions" in p for p in problems)
    assert any("notes.whl: not a wheel file name" in p for p in problems)
    assert any(p.startswith("wheels total") and "> 60 MB" in p for p in problems)
    assert any(p.startswith("no wheel of megatron-core") for p in check_wheels(tmp_path)
               ["problems"])


@pytest.mark.e2e
def test_gpu_check_plan_runs_nothing_and_checks_what_a_cpu_can(tmp_path):
    """--plan: every step planned (its files exist, its configs load, pytest collects the GPU
    tests); without the megatron-core wheel it says so and exits 1."""
    out = tmp_path / "plan.json"
    proc = run_script("benchmarks/gpu_check.py", "--plan", "--out", str(out),
                      "--wheels", str(tmp_path), timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "plan"
    assert {name: step["status"] for name, step in report["steps"].items()} == {
        step.name: "planned" for step in gpu_steps()}
    assert len(report["steps"]["gpu_tests"]["collected"]) == 2
    assert report["environment"]["cuda_available"] is False  # the helpers hide any GPU
    assert [p for p in report["wheels"]["problems"] if p.startswith("no wheel of megatron-core")]
    assert "problem: no wheel of megatron-core" in proc.stdout
