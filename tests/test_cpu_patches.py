"""One test per CPU patch: upstream still needs it (the source it works around is there), and
the patch does its job. If Megatron-Core or torch change underneath, these fail first."""

import inspect

import pytest
import torch
from megatron.core.optimizer import clip_grads, distrib_optimizer
from megatron.core.tensor_parallel import mappings
from megatron.core.tensor_parallel import random as mp_random
from megatron.core.transformer.moe import router, token_dispatcher

from megatron_grove.runtime import cpu_patches
from megatron_grove.runtime.cpu_patches import CPU_PATCHES, apply_cpu_patches
from processes import run_distributed, run_python


@pytest.fixture(autouse=True, scope="module")
def patched():
    apply_cpu_patches()


def test_every_patch_is_tested_here():
    tested = {name[len("test_patch_"):] for name in globals() if name.startswith("test_patch_")}
    assert tested == {p.name for p in CPU_PATCHES}


def test_patch_cuda_device_to_cpu():
    assert "torch.cuda.current_device()" in inspect.getsource(router.TopKRouter.__init__)
    assert "device='cuda'" in inspect.getsource(clip_grads.get_grad_norm_fp32)
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(1).cuda().device.type == "cpu"
    assert torch.ones(1).to("cuda").device.type == "cpu"
    assert torch.tensor([1.0], device=torch.cuda.current_device()).device.type == "cpu"

    seen = []

    class AllocatesInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):  # autograd drops the function mode here
            seen.append(torch.empty(1, device=torch.cuda.current_device()).device.type)
            return grad * 2

    x = torch.ones(3, requires_grad=True)
    AllocatesInBackward.apply(x).sum().backward()
    assert seen == ["cpu"] and torch.equal(x.grad, torch.full((3,), 2.0))


def test_patch_cuda_type_names():
    assert "'torch.cuda.FloatTensor'" in inspect.getsource(clip_grads.clip_grad_by_total_norm_fp32)
    assert torch.zeros(1).type() == "torch.cuda.FloatTensor"
    assert torch.zeros(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.zeros(1).type(torch.float64).dtype == torch.float64  # conversions untouched


def test_patch_cuda_streams_noop():
    source = inspect.getsource(token_dispatcher.MoEAlltoAllTokenDispatcher)
    assert "torch.cuda.Stream()" in source and "record_event()" in source
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        event = stream.record_event()
    event.synchronize()
    torch.cuda.synchronize()
    assert torch.cuda.current_stream() == torch.cuda.current_stream()


def test_patch_cuda_rng_to_cpu():
    assert "torch.cuda.manual_seed" in inspect.getsource(mp_random.CudaRNGStatesTracker.add)
    tracker = mp_random.CudaRNGStatesTracker()
    tracker.add("probe", 7)
    torch.manual_seed(0)
    with tracker.fork("probe"):
        first = torch.rand(4)
    outside = torch.rand(4)
    tracker.reset()
    tracker.add("probe", 7)
    with tracker.fork("probe"):
        again = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(first, again)  # the named stream is reproducible
    assert torch.equal(outside, torch.rand(4))  # and forking leaves the default stream alone


def _alltoall_with_tensor_splits(rank):
    x = torch.arange(3.0) + 10 * rank
    out = torch.empty(3)
    splits = torch.tensor([1, 2]) if rank == 0 else torch.tensor([2, 1])
    torch.distributed.all_to_all_single(out, x, splits, splits)
    return out


def test_patch_alltoall_splits_as_lists():
    assert "output_split_sizes" in inspect.getsource(token_dispatcher.MoEAlltoAllTokenDispatcher)
    out = run_distributed(_alltoall_with_tensor_splits, world_size=2)
    assert out[0].tolist() == [0.0, 10.0, 11.0]
    assert out[1].tolist() == [1.0, 2.0, 12.0]
    assert cpu_patches._as_int_list(torch.tensor([3, 4])) == [3, 4]


def _gather_uneven_slices(rank):
    """What Megatron's ``gather_from_sequence_parallel_region`` does with split sizes."""
    x = torch.arange(2.0 + rank).unsqueeze(1) + 10 * rank
    output = torch.empty(5, 1)
    torch.distributed.all_gather(list(torch.split(output, [2, 3])), x)
    return output


def test_patch_gloo_all_gather_uneven():
    source = inspect.getsource(mappings._gather_along_first_dim)
    assert "torch.distributed.all_gather(output_tensor_list" in source
    out = run_distributed(_gather_uneven_slices, world_size=2)
    assert out[0].flatten().tolist() == out[1].flatten().tolist() == [0, 1, 10, 11, 12]


class _TorchAdamDistOptStub:
    """Just what ``load_parameter_state_from_fully_reshardable`` touches when this rank holds
    no parameter ranges, plus a torch-Adam state with ``step`` tensors."""

    def __init__(self):
        self.gbuf_ranges, self.buffers = [], []
        self.step = torch.tensor(7.0)
        self.optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))])
        self.optimizer.state[self.optimizer.param_groups[0]["params"][0]] = {
            "step": self.step, "exp_avg": torch.zeros(2)}


def test_patch_distopt_reshardable_load_without_step():
    load = distrib_optimizer.DistributedOptimizer.load_parameter_state_from_fully_reshardable
    upstream = inspect.getsource(inspect.getclosurevars(load).nonlocals["upstream"])
    assert 'if k == "step":' in upstream  # the checkpoint's step is skipped ...
    setter = inspect.getsource(
        distrib_optimizer.DistributedOptimizer._set_main_param_and_optimizer_states)
    assert "for key in dst_tensors:" in setter and "tensors[key]" in setter  # ... then read
    stub = _TorchAdamDistOptStub()
    load(stub, {})
    (state,) = stub.optimizer.state.values()
    assert state["step"] is stub.step and set(state) == {"step", "exp_avg"}


def test_patch_torch_compile_off():
    from megatron.core import jit

    assert jit.jit_fuser is torch.compile
    assert torch._dynamo.config.disable
    calls = []

    @torch.compile
    def f(x):
        calls.append(1)
        return x + 1

    assert torch.equal(f(torch.zeros(1)), torch.ones(1)) and calls == [1]


CUDA_PRESENT_BUT_CPU_RUN = """
import torch
torch.cuda.is_available = lambda: True  # a GPU host, as far as anything here can tell
torch.cuda.device_count = lambda: 1
from megatron_grove.config import load_config
from megatron_grove.megatron_config import to_transformer_config
from megatron_grove.model import build_gpt_model, causal_attention_mask
from megatron_grove.runtime import single_process_world
from megatron_grove.runtime.cpu_patches import CPU_PATCHES
cfg = load_config(None, ["model.num_layers=1", "model.hidden_size=32",
                         "model.num_attention_heads=2", "moe.num_experts=4",
                         "moe.num_expert_groups=2", "moe.ffn_hidden_size=16",
                         "moe.adjugate_scale=0.5", "runtime.device=cpu"])
with single_process_world(device=cfg.runtime.device) as runtime:
    assert runtime.device.type == "cpu", runtime.device
    assert torch.cuda.current_device() == torch.device("cpu")  # cuda_device_to_cpu applied
    model = build_gpt_model(to_transformer_config(cfg), vocab_size=64, seq_length=8)
    tokens = torch.randint(0, 64, (2, 8))
    loss = model(tokens, torch.arange(8).expand(2, 8), causal_attention_mask(8, "cpu"),
                 labels=tokens)
    loss.mean().backward()
print("cpu run ok with", len(CPU_PATCHES), "patches")
"""


def test_patches_apply_for_a_cpu_run_on_a_machine_with_a_gpu():
    """What counts is the run's device: in a process where CUDA reports available, a run on
    ``runtime.device=cpu`` gets the CPU patches and trains a step of a Grove model."""
    proc = run_python(CUDA_PRESENT_BUT_CPU_RUN)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "cpu run ok" in proc.stdout
