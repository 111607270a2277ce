"""Triton kernels against their plain-torch references (values and gradients, fp32, 1e-5).

On CPU under ``TRITON_INTERPRET=1`` (set in ``conftest.py``): small shapes, widths chosen off
the power-of-two blocks so that masking is exercised. Compiled on a GPU: ``tests/test_gpu.py``.
"""

import pytest
import torch

from megatron_grove.kernels.grove_combine import grove_combine, grove_combine_reference
from megatron_grove.kernels.permute import permute, sorted_rows, unpermute
from megatron_grove.kernels.swiglu import SwiGLU, swiglu

DEVICE = "cpu"
TOL = dict(rtol=1e-5, atol=1e-5)


def _both(fn, inputs, grad_out_seed=0):
    """Run ``fn(backend)`` for both backends; return (outputs, grads w.r.t. ``inputs``) each."""
    results = {}
    for backend in ("torch", "triton"):
        out = fn(backend)
        gen = torch.Generator(device="cpu").manual_seed(grad_out_seed)
        grad_out = torch.randn(out.shape, generator=gen).to(out.device)
        grads = torch.autograd.grad(out, inputs, grad_out)
        results[backend] = (out.detach(), grads)
    return results["torch"], results["triton"]


def _assert_match(reference, triton_result):
    (ref_out, ref_grads), (out, grads) = reference, triton_result
    torch.testing.assert_close(out, ref_out, **TOL)
    for g, ref_g in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref_g, **TOL)


@pytest.mark.parametrize("shape", [(5, 2 * 37), (2, 3, 2 * 48), (0, 2 * 8)])
def test_swiglu_matches_reference(shape):
    x = torch.randn(shape, device=DEVICE, requires_grad=True)
    ref, tri = _both(lambda backend: swiglu(x, backend), (x,))
    _assert_match(ref, tri)
    gate, up = x.detach().chunk(2, dim=-1)  # Megatron's glu: silu(first half) * second half
    torch.testing.assert_close(ref[0], torch.nn.functional.silu(gate) * up)


def test_swiglu_module_reads_backend_from_config():
    class Cfg:
        grove_kernels_backend = "triton"

    module = SwiGLU(config=Cfg())
    x = torch.randn(4, 2 * 24, device=DEVICE)
    assert module.backend == "triton"
    torch.testing.assert_close(module(x), swiglu(x, "torch"), **TOL)
    with pytest.raises(ValueError, match="allowed torch, triton"):
        SwiGLU(config=Cfg(), backend="cuda")


def test_sorted_rows_orders_by_column_then_token():
    routing_map = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    row_token, row_column, per_column = sorted_rows(routing_map)
    assert row_token.tolist() == [0, 2, 2, 0, 1]
    assert row_column.tolist() == [0, 0, 1, 2, 2]
    assert per_column.tolist() == [2, 1, 2]


@pytest.mark.parametrize("weighted", [True, False])
def test_permute_unpermute_match_reference(weighted):
    torch.manual_seed(0)
    num_tokens, width = 11, 37
    routing_map = torch.rand(num_tokens, 4) < 0.5
    routing_map[3] = False  # a token with no rows
    row_token = sorted_rows(routing_map)[0].to(DEVICE)
    x = torch.randn(num_tokens, width, device=DEVICE, requires_grad=True)
    w = torch.rand(row_token.shape[0], device=DEVICE, requires_grad=True)

    def round_trip(backend):
        rows = permute(x, row_token, backend) * 1.5  # an op between, as the experts are
        return unpermute(rows, row_token, w if weighted else None, num_tokens, backend)

    inputs = (x, w) if weighted else (x,)
    ref, tri = _both(round_trip, inputs)
    _assert_match(ref, tri)
    assert ref[0][3].abs().max() == 0  # the token with no rows gets nothing


def test_unpermute_sums_a_tokens_rows():
    y = torch.arange(6.0, device=DEVICE).reshape(3, 2)
    row_token = torch.tensor([1, 0, 1], device=DEVICE)
    w = torch.tensor([1.0, 2.0, 0.5], device=DEVICE)
    out = unpermute(y, row_token, w, 3, "triton")
    assert out.tolist() == [[4.0, 6.0], [2.0, 3.5], [0.0, 0.0]]


def _grove_rows(num_tokens, groups, per_group, seed):
    gen = torch.Generator().manual_seed(seed)
    routing_map = torch.rand(num_tokens, groups * per_group, generator=gen) < 0.35
    probs = torch.rand(routing_map.shape, generator=gen) * routing_map
    group_hit = routing_map.reshape(num_tokens, groups, per_group).any(dim=-1)
    row_token, row_group, _ = sorted_rows(group_hit)
    return probs, group_hit, row_token, row_group


@pytest.mark.parametrize("per_group,with_base", [(2, True), (3, False), (1, True)])
def test_grove_combine_matches_reference(per_group, with_base):
    num_tokens, groups, width, lam = 9, 3, 37, 0.3
    probs, _, row_token, row_group = _grove_rows(num_tokens, groups, per_group, seed=per_group)
    probs = probs.to(DEVICE).requires_grad_()
    row_token, row_group = row_token.to(DEVICE), row_group.to(DEVICE)
    adj = torch.randn(row_token.shape[0], width, device=DEVICE, requires_grad=True)
    base = torch.randn(num_tokens, width, device=DEVICE, requires_grad=True)

    def combine(backend):
        return grove_combine(adj, row_token, row_group, probs, per_group, lam,
                             base if with_base else None, backend)

    inputs = (adj, probs, base) if with_base else (adj, probs)
    ref, tri = _both(combine, inputs)
    _assert_match(ref, tri)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_grove_combine_with_no_tokens(backend):
    """An EP rank that received nothing: ``[0, H]`` out, gradients of the right shapes."""
    probs = torch.zeros(0, 4, device=DEVICE, requires_grad=True)
    adj = torch.zeros(0, 5, device=DEVICE, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long, device=DEVICE)
    out = grove_combine(adj, empty, empty, probs, 2, 0.5, backend=backend)
    assert out.shape == (0, 5)
    grads = torch.autograd.grad(out.sum() + 0 * adj.sum() + 0 * probs.sum(), (adj, probs))
    assert [g.shape for g in grads] == [(0, 5), (0, 4)]


def test_grove_combine_reference_is_the_grove_formula():
    """lam * sum over hit groups of (sum of the group's rho) * A_g(x_t), token by token."""
    num_tokens, groups, per_group, width, lam = 6, 4, 2, 5, 0.25
    probs, group_hit, row_token, row_group = _grove_rows(num_tokens, groups, per_group, seed=7)
    adjugate_of = torch.randn(num_tokens, groups, width)  # A_g(x_t) for every pair
    adj = adjugate_of[row_token, row_group]
    out = grove_combine_reference(adj, row_token, row_group, probs, per_group, lam)
    for t in range(num_tokens):
        expected = torch.zeros(width)
        for g in range(groups):
            if group_hit[t, g]:
                rho = probs[t, g * per_group:(g + 1) * per_group].sum()
                expected += lam * rho * adjugate_of[t, g]
        torch.testing.assert_close(out[t], expected)


def test_bad_backend_is_rejected():
    with pytest.raises(ValueError, match="kernel backend 'cuda'"):
        swiglu(torch.randn(2, 4), "cuda")
