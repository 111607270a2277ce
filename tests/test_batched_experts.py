"""BatchedSequentialMLP (the adjugate bank on the local spec, CPU): the same outputs and
gradients as Megatron's SequentialMLP with the same weights, an expert without rows included;
Megatron's loop wherever the grouped product would compute something else."""

import functools

import torch
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from config_builders import transformer_config
from megatron_grove.moe.batched_experts import BatchedSequentialMLP, batched_experts_builder
from processes import in_world

H, F, EXPERTS = 16, 8, 4


def _config(**keys):
    return transformer_config(**{"model__num_layers": 1, "model__hidden_size": H,
                                 "model__num_attention_heads": 1, "moe__num_experts": EXPERTS,
                                 "moe__ffn_hidden_size": F, **keys})


def _mlp_submodules():
    """The expert MLPs' submodules of Megatron's local MoE spec."""
    spec = get_moe_module_spec(use_te=False, num_experts=EXPERTS)
    return spec.keywords["submodules"].experts.keywords["submodules"]


def _banks(config):
    """Megatron's loop and the batched bank, the second with the first's weights."""
    submodules = _mlp_submodules()
    pgs = get_default_pg_collection()
    loop = SequentialMLP(EXPERTS, config, submodules, pg_collection=pgs)
    batched = BatchedSequentialMLP(EXPERTS, config, submodules, pg_collection=pgs)
    batched.load_state_dict(loop.state_dict())
    return loop, batched


def _compare(tokens_per_expert: list[int]) -> dict:
    torch.manual_seed(0)
    loop, batched = _banks(_config())
    counts = torch.tensor(tokens_per_expert)
    x = torch.randn(int(counts.sum()), H)
    probs = torch.rand(x.shape[0])
    cotangent = torch.randn(x.shape[0], H)
    results = []
    for bank in (loop, batched):
        xi, pi = x.clone().requires_grad_(), probs.clone().requires_grad_()
        out, bias = bank(xi, counts, pi)
        (out * cotangent).sum().backward()
        results.append({"out": out.detach(), "x": xi.grad, "probs": pi.grad, "bias": bias,
                        **{f"{i}.{name}": p.grad for i, e in enumerate(bank.local_experts)
                           for name, p in e.named_parameters()}})
    return {"loop": results[0], "batched": results[1], "batched_path": batched._batched(x)}


def test_batched_bank_equals_megatrons_loop():
    for counts in ([3, 0, 5, 1], [2, 2, 2, 2], [0, 0, 7, 0]):
        got = in_world(_compare, counts)
        assert got["batched_path"]
        loop, batched = got["loop"], got["batched"]
        assert loop.keys() == batched.keys() and batched["bias"] is None
        for key in loop:
            if key == "bias":
                continue
            torch.testing.assert_close(batched[key], loop[key], rtol=1e-6, atol=1e-6,
                                       msg=f"{counts} {key}")


def _sum_backward() -> bool:
    """A ``sum`` hands the bank an expanded (stride-0) gradient."""
    _, batched = _banks(_config())
    x = torch.randn(5, H, requires_grad=True)
    out, _ = batched(x, torch.tensor([2, 0, 3, 0]), torch.rand(5))
    out.sum().backward()
    return x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_batched_bank_takes_any_gradient_layout():
    assert in_world(_sum_backward)


def _paths() -> dict[str, bool]:
    x = torch.zeros(3, H)
    plain = _banks(_config())[1]._batched(x)
    triton = _banks(_config(kernels__backend="triton"))[1]._batched(x)  # SwiGLU module
    one = BatchedSequentialMLP(1, _config(), _mlp_submodules(),
                               pg_collection=get_default_pg_collection())._batched(x)
    unaligned = _banks(_config(moe__ffn_hidden_size=6))[1]._batched(x)  # 24-byte rows
    return {"plain": plain, "triton activation": triton, "one expert": one,
            "unaligned": unaligned}


def test_what_the_batched_product_does_not_reproduce_takes_megatrons_loop():
    assert in_world(_paths) == {"plain": True, "triton activation": False, "one expert": False,
                                "unaligned": False}


def test_builder_swaps_only_sequential_mlp():
    stock = functools.partial(SequentialMLP, submodules="s")
    swapped = batched_experts_builder(stock)
    assert swapped.func is BatchedSequentialMLP and swapped.keywords == {"submodules": "s"}
    other = functools.partial(dict, a=1)
    assert batched_experts_builder(other) is other
