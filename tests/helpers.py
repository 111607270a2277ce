"""What several test modules share: running code on gloo ranks, in child processes and under
torchrun; configs built through the config path; tiny ``transformers`` peers; the Grove-layer
cases that compare the layer with the plain-torch reference (:mod:`grove_reference`).

Every child process these helpers start runs on CPU: they hide any GPU from it
(``CUDA_VISIBLE_DEVICES=""``), so the suite means the same on a GPU host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

# Import the heavy modules once in the parent so forked workers inherit them (~3 s each).
import megatron.core.models.gpt  # noqa: F401
import megatron.core.transformer.moe.moe_layer  # noqa: F401
import numpy as np
import torch
import torch.distributed as dist

from grove_reference import GroveWeights, grove_forward
from megatron_grove.config import load_config
from megatron_grove.megatron_config import GroveTransformerConfig, to_transformer_config
from megatron_grove.runtime import destroy_parallel, initialize_parallel
from megatron_grove.runtime.acceleration import resolve_acceleration
from megatron_grove.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "pretrain_grove.py"
TINY = ROOT / "configs" / "tiny_cpu.yaml"
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}

# --------------------------------------------------------------------------------------
# processes: forked gloo ranks, scripts, torchrun
# --------------------------------------------------------------------------------------


def _worker(rank, world_size, init_file, parallel, fn, args, queue):
    # The parent's OpenMP thread pool does not survive fork(): a worker's first multi-threaded
    # op would hang once the parent ran one. One thread per worker, as DataLoader workers do.
    torch.set_num_threads(1)
    try:
        initialize_parallel(**parallel, device="cpu", timeout_s=120,
                            init_method=f"file://{init_file}", rank=rank, world_size=world_size)
        try:
            # pickled to bytes: tensors sent as such would be shared by file descriptor and
            # vanish if this worker exits before the parent reads them
            queue.put((rank, "ok", pickle.dumps(fn(rank, *args))))
        finally:
            destroy_parallel()
    except BaseException:  # report everything, including SystemExit from the code under test
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, tensor_parallel: int = 1,
                    expert_parallel: int = 1, seed: int = 1234, args: tuple = (),
                    timeout_s: float = 300,
                    expert_tensor_parallel: Optional[int] = None,
                    context_parallel: int = 1) -> list[Any]:
    """``fn(rank, *args)`` on ``world_size`` forked CPU processes (gloo, Megatron's groups set
    up); the return values (picklable) come back indexed by rank. An exception on any rank
    fails the caller with that rank's traceback. Forked workers start in ~0.2 s."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        parallel = dict(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                        expert_tensor_parallel=expert_tensor_parallel,
                        context_parallel=context_parallel, seed=seed)
        procs = [ctx.Process(target=_worker,
                             args=(r, world_size, init_file, parallel, fn, args, queue))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout_s)
                if status == "error":
                    errors.append(f"rank {rank}:\n{payload}")
                    break
                results[rank] = pickle.loads(payload)
        finally:
            for p in procs:
                p.join(timeout=5 if errors else timeout_s)
                if p.is_alive():
                    p.kill()
        if errors:
            raise AssertionError("distributed worker failed\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def in_world(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a forked one-process Megatron world (a world set up in the pytest
    process itself would break the forked workers of later tests)."""
    return run_distributed(lambda rank, *a: fn(*a), world_size=1, args=args)[0]


def child_env(extra: Optional[dict[str, str]] = None) -> dict[str, str]:
    """This process's environment for a CPU-only child, this checkout first on PYTHONPATH."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, **CPU_ONLY_ENV, "PYTHONPATH": pythonpath, **(extra or {})}


def run_script(script: str, *args: str, timeout: float = 300,
               env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """``python ROOT/script *args`` (a tool, benchmark or launcher), stdout and stderr captured
    as text; ``env`` adds to (or replaces entries of) the child's environment."""
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=timeout, env=child_env(env))


def run_python(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -c code`` in a CPU-only child (as :func:`run_script`)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=child_env())


def child_pids(pid: int | None = None) -> list[int]:
    """The live child processes of ``pid`` (default: this process)."""
    pid = pid or os.getpid()
    tasks = Path(f"/proc/{pid}/task")
    return sorted(int(c) for task in (tasks.iterdir() if tasks.is_dir() else [])
                  for c in (task / "children").read_text().split())


def processes_with_env(name: str, value: str) -> list[str]:
    """``"PID CMDLINE"`` of every live process whose environment has ``name=value`` (tag the
    processes of one run with a unique value to find what outlived it)."""
    needle = f"{name}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if needle in (proc / "environ").read_bytes().split(b"\0"):
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":  # a zombie is gone, only not yet reaped
                    found.append(f"{proc.name} {cmd[:120]}")
        except OSError:  # exited meanwhile, or not ours to read
            continue
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Small and fast: 8 steps of 8 sequences x 32 tokens of the tiny config.
FAST = ["model.seq_length=32", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "moe.ffn_hidden_size=64", "train.iters=8", "train.lr_warmup_iters=2",
        "train.global_batch_size=8", "train.micro_batch_size=2", "logging.progress_bar=false"]


def torchrun_command(*overrides: str, nproc: int = 2, config: Path = TINY) -> list[str]:
    """A torchrun command line of ``launch/pretrain_grove.py`` on ``config`` + FAST."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(LAUNCH),
            "--config", str(config), *FAST, *overrides]


def torchrun(*overrides: str, nproc: int = 2, check: bool = True, timeout: float = 600,
             env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess:
    """Run the tiny config (+ FAST + ``overrides``) under real torchrun on CPU (``env``: extra
    environment variables)."""
    proc = subprocess.run(torchrun_command(*overrides, nproc=nproc), capture_output=True,
                          text=True, timeout=timeout, env=child_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(log_dir: Path) -> dict[int, float]:
    """``{step: loss}`` of a run's ``metrics.jsonl``."""
    return {r["step"]: r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")}


# --------------------------------------------------------------------------------------
# configs through the config path
# --------------------------------------------------------------------------------------


def transformer_config(device: str = "cpu", **keys: Any) -> GroveTransformerConfig:
    """Megatron's config of ``load_config(None, overrides)`` with the fast paths resolved for
    ``device``; the overrides are keyword arguments with ``__`` for the section dot:
    ``transformer_config(moe__num_experts=8)``."""
    overrides = [f"{key.replace('__', '.')}={value}" for key, value in keys.items()]
    cfg = load_config(None, overrides)
    return to_transformer_config(cfg, acceleration=resolve_acceleration(cfg, device))


# --------------------------------------------------------------------------------------
# tiny transformers peers (Megatron's window convention for perplexity)
# --------------------------------------------------------------------------------------

VOCAB = 300  # not a multiple of 128: exercises Megatron's vocabulary padding


def tiny_qwen3_moe(path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                   max_shard_size: str | None = "200KB", **overrides):
    """A random ``Qwen3MoeForCausalLM`` (2 layers, 8 experts top-2) saved to ``path``."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                            moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, num_experts=8,
                            num_experts_per_tok=2, norm_topk_prob=True, max_position_embeddings=64,
                            rope_theta=10000.0, initializer_range=0.1, **overrides)
    model = Qwen3MoeForCausalLM(config).to(dtype).eval()
    model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return model


def tiny_llama(path: Path, seed: int = 0, tokenizer_file: Optional[str] = None, **overrides):
    """A random ``LlamaForCausalLM`` (2 layers, hidden 64) saved to ``path``; with
    ``tokenizer_file`` (a ``tokenizer.json``) its tokenizer is saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(seed)
    config = LlamaConfig(**{**dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   rope_theta=100000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=True, initializer_range=0.1),
                            **overrides})
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    if tokenizer_file is not None:
        PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="<|endoftext|>",
                                pad_token="<|pad|>").save_pretrained(path)
    return model


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).astype(np.int64)


@torch.no_grad()
def hf_perplexity(model, tokens: np.ndarray, seq_length: int) -> float:
    """exp(mean NLL) computed by ``transformers``, over windows [kL, kL+L] (inputs the first
    L, targets the last L)."""
    t = torch.as_tensor(tokens)
    n = (t.numel() - 1) // seq_length
    x = t[:n * seq_length].reshape(n, seq_length)
    y = t[1:n * seq_length + 1].reshape(n, seq_length)
    logits = model(input_ids=x).logits.float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return math.exp(float(nll))


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``folder``."""
    from safetensors.torch import load_file

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _our_perplexity(cfg, state, tokens, seq_length: int) -> float:
    from megatron_grove.evaluation import perplexity
    from megatron_grove.hf_conversion import build_model, load_state_into_model

    model = build_model(cfg)
    load_state_into_model(model, cfg, state)
    return perplexity(model, tokens, seq_length, cfg.model.vocab_size, progress=False).ppl


def our_perplexity(cfg, state, tokens, seq_length: int = 32) -> float:
    """Perplexity of (config, global state dict) with our Megatron model, in a forked world."""
    return in_world(_our_perplexity, cfg, state, tokens, seq_length)


def random_model_state_here(cfg, seed: int = 0, bias_std: float = 0.2
                            ) -> dict[str, torch.Tensor]:
    """:func:`random_model_state` inside an existing (forked) world."""
    from megatron_grove.hf_conversion import build_model, model_state_dict

    torch.manual_seed(seed)
    model = build_model(cfg, initialize=True)
    state = model_state_dict(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    for name in sorted(state):
        if name.endswith("expert_bias"):
            state[name] = torch.randn(state[name].shape, generator=gen) * bias_std
    return state


def random_model_state(cfg, seed: int = 0, bias_std: float = 0.2) -> dict[str, torch.Tensor]:
    """The global state dict of our model for ``cfg`` at random initial weights (built in a
    forked world), every expert bias drawn from ``N(0, bias_std^2)``."""
    return in_world(random_model_state_here, cfg, seed, bias_std)


# Every Grove config of configs/ at a CPU-sized width and depth: the same experts, top-k,
# groups, adjugate fields, score function and balancing (the tiny config as it is, with the
# shipped tokenizer's vocabulary, as training sets it).
# grovemoe_33b_a3b_1node_proxy.yaml is grovemoe_33b_a3b.yaml with 12 layers: the same family.
REDUCED_WIDTH = ["model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
                 "model.num_query_groups=1", "model.kv_channels=16", "model.ffn_hidden_size=96",
                 "model.seq_length=64", "model.vocab_size=512", "moe.ffn_hidden_size=16"]
GROVE_CONFIG_FAMILIES = {
    "tiny_cpu": (ROOT / "configs" / "tiny_cpu.yaml", ["model.vocab_size=4096"]),
    "grovemoe_33b_a3b": (ROOT / "configs" / "grovemoe_33b_a3b.yaml", REDUCED_WIDTH),
    "grovemoe_33b_g16": (ROOT / "configs" / "grovemoe_33b_g16.yaml", REDUCED_WIDTH),
}


def grove_family_config(name: str, *overrides: str):
    """The config of family ``name`` (:data:`GROVE_CONFIG_FAMILIES`) + ``overrides``, on one CPU
    process in fp32."""
    path, reduced = GROVE_CONFIG_FAMILIES[name]
    return load_config(path, [*reduced, "runtime.device=cpu", "runtime.dtype=fp32",
                              "parallel.expert_model_parallel_size=1",
                              "parallel.use_distributed_optimizer=false",
                              "parallel.recompute_granularity=none", *overrides])


# --------------------------------------------------------------------------------------
# Grove layer cases: the layer on gloo ranks vs the plain-torch reference
# --------------------------------------------------------------------------------------

HIDDEN, FFN, ADJUGATE_FFN, NUM_TOKENS = 16, 8, 6, 32
DISPATCHERS = ("alltoall", "allgather")
GRAD_KEYS = ("router", "expert_fc1", "expert_fc2", "adjugate_fc1", "adjugate_fc2")
ALL_KEYS = ("y", "x_grad") + GRAD_KEYS


@dataclass(frozen=True)
class Case:
    experts: int
    topk: int
    groups: int
    score_function: str

    @property
    def id(self) -> str:
        return f"E{self.experts}k{self.topk}G{self.groups}-{self.score_function}"


CASES = (Case(8, 2, 4, "softmax"), Case(8, 2, 4, "sigmoid"), Case(8, 3, 2, "softmax"),
         Case(16, 4, 8, "sigmoid"), Case(4, 1, 4, "sigmoid"))


@dataclass
class Run:
    """One forward/backward of one layer over ``NUM_TOKENS`` tokens split across the EP ranks."""

    case: Case
    dispatcher: str  # moe.token_dispatcher_type
    weights: GroveWeights
    x: torch.Tensor  # [NUM_TOKENS, H]
    cotangent: torch.Tensor  # [NUM_TOKENS, H]: the loss is sum(y * cotangent)
    adjugate_scale: float
    expert_bias: Optional[torch.Tensor] = None  # [E]; None: moe.bias_update_rule=none
    stock: bool = False  # Megatron's MoELayer + TopKRouter instead of GroveMoELayer
    kernels_backend: str = "torch"  # kernels' implementation (group-aware dispatch path)


@functools.cache
def case_data(case: Case) -> tuple[GroveWeights, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, expert bias ``[E]``, tokens ``[N, H]`` and cotangent ``[N, H]`` of a case. Every
    other token points along one group's router direction, so it selects experts of that group
    (all of its k when k <= E/G)."""
    seed = CASES.index(case)
    weights = GroveWeights.random(case.experts, case.groups, HIDDEN, FFN, ADJUGATE_FFN,
                                  seed=seed, group_affinity=2.0)
    gen = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    directions = GroveWeights.group_directions(case.groups, HIDDEN)
    focused = torch.arange(0, NUM_TOKENS, 2)
    x[focused] = 0.3 * x[focused] + 2.0 * directions[focused % case.groups]
    bias = 0.05 * torch.randn(case.experts, generator=gen)
    return weights, bias, x, torch.randn(NUM_TOKENS, HIDDEN, generator=gen)


def grove_run(case: Case, dispatcher: str, **overrides: Any) -> Run:
    weights, bias, x, cotangent = case_data(case)
    run = Run(case, dispatcher, weights, x, cotangent,
              adjugate_scale=case.groups / case.experts, expert_bias=bias)
    return dataclasses.replace(run, **overrides)


def reference_of(run: Run) -> tuple[dict[str, torch.Tensor], Any]:
    """The reference's output, input gradient and weight gradients for ``run``, and its
    :class:`grove_reference.ReferenceOutput` (counts)."""
    weights = GroveWeights(*(t.clone() for t in dataclasses.astuple(run.weights))).requires_grad_()
    x = run.x.clone().requires_grad_()
    out = grove_forward(x, weights, run.case.topk, run.case.groups, run.adjugate_scale,
                        run.case.score_function, expert_bias=run.expert_bias)
    (out.y * run.cotangent).sum().backward()
    return {"y": out.y.detach(), "x_grad": x.grad, **weights.grads()}, out


@functools.cache
def reference(case: Case) -> tuple[dict[str, torch.Tensor], int, int]:
    """:func:`reference_of` ``grove_run(case)``, with its (token, expert) and (token, group)
    evaluation counts."""
    expected, out = reference_of(grove_run(case, "alltoall"))
    return expected, out.routed_evaluations, out.adjugate_evaluations


def layer_config(run: Run, ep: int, device: str = "cpu", tp: int = 1,
                 etp: Optional[int] = None) -> GroveTransformerConfig:
    """The run's one-layer config (local modules, no TransformerEngine), through the config
    path; ``tp`` > 1 with sequence parallelism, ``etp``: the experts' TP size (None: ``tp``)."""
    case = run.case
    return transformer_config(
        device, precision__transformer_engine=False, model__num_layers=1,
        model__hidden_size=HIDDEN, model__num_attention_heads=tp,
        model__ffn_hidden_size=FFN, moe__num_experts=case.experts, moe__ffn_hidden_size=FFN,
        moe__router_topk=case.topk, moe__router_score_function=case.score_function,
        moe__token_dispatcher_type=run.dispatcher, moe__num_expert_groups=case.groups,
        moe__adjugate_ffn_hidden_size=ADJUGATE_FFN, moe__adjugate_scale=run.adjugate_scale,
        moe__allow_large_adjugate_scale=True,
        moe__bias_update_rule="none" if run.expert_bias is None else "paper",
        parallel__expert_model_parallel_size=ep, kernels__backend=run.kernels_backend,
        parallel__tensor_model_parallel_size=tp, parallel__sequence_parallel=tp > 1,
        **({} if etp is None else {"parallel__expert_tensor_parallel_size": etp}))


def build_layer(run: Run, ep: int, device: str = "cpu", tp: int = 1, etp: Optional[int] = None):
    """The run's layer, built by :func:`megatron_grove.moe.build_moe_layer` (``stock``:
    Megatron's ``MoELayer`` + ``TopKRouter``, on Megatron's MoE spec)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_grove.moe import build_moe_layer

    config = layer_config(run, ep, device, tp, etp)
    if run.stock:
        submodules = get_moe_module_spec(use_te=False, num_experts=run.case.experts).keywords[
            "submodules"]
        return MoELayer(config, submodules=dataclasses.replace(submodules, router=TopKRouter))
    return build_moe_layer(config)


def _expert_params(layer, ep_rank: int) -> dict[str, dict[int, torch.nn.Parameter]]:
    """``{'expert_fc1': {global expert: weight}, ..., 'adjugate_fc2': {group: weight}}``."""
    params: dict[str, dict[int, torch.nn.Parameter]] = {}
    banks = [("expert", layer.experts)]
    if getattr(layer, "adjugate_experts", None) is not None:
        banks.append(("adjugate", layer.adjugate_experts))
    for kind, experts in banks:
        local = experts.local_experts
        for fc in ("fc1", "fc2"):
            params[f"{kind}_{fc}"] = {ep_rank * len(local) + i: getattr(mlp, f"linear_{fc}").weight
                                      for i, mlp in enumerate(local)}
    return params


def load_weights(layer, run: Run, ep_rank: int) -> None:
    """Copy the run's router, bias, expert and adjugate weights into ``layer`` (EP rank
    ``ep_rank``'s slice)."""
    with torch.no_grad():
        layer.router.weight.copy_(run.weights.router)
        if run.expert_bias is not None:
            layer.router.expert_bias.copy_(run.expert_bias)
        for key, params in _expert_params(layer, ep_rank).items():
            for index, param in params.items():
                param.copy_(getattr(run.weights, key)[index])


def _forward_backward(rank: int, runs: list[Run]) -> bytes:
    """Worker: each run's local output, input gradient, weight gradients and counters."""
    from megatron.core import parallel_state

    ep = parallel_state.get_expert_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    etp = parallel_state.get_expert_tensor_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    world = dist.get_world_size()
    results = []
    for run in runs:
        layer = build_layer(run, ep, tp=tp, etp=etp)
        load_weights(layer, run, ep_rank)
        # every rank its own tokens (TP ranks: their sequence-parallel slice)
        rows = slice(rank * NUM_TOKENS // world, (rank + 1) * NUM_TOKENS // world)
        x = run.x[rows].clone().unsqueeze(1).requires_grad_()  # [T, B=1, H]
        y, _ = layer(x)
        (y.squeeze(1) * run.cotangent[rows]).sum().backward()
        grads = {key: {i: p.grad.clone() for i, p in params.items()}
                 for key, params in _expert_params(layer, ep_rank).items()}
        results.append({"y": y.detach().squeeze(1), "x_grad": x.grad.squeeze(1),
                        "router": layer.router.weight.grad.clone(), **grads,
                        "counters": dict(getattr(layer, "grove_counters", {}))})
    return pickle.dumps(results)


def run_layers(runs: list[Run], ep: int, world_size: Optional[int] = None, tp: int = 1,
               etp: Optional[int] = None) -> list[dict[str, Any]]:
    """Run ``runs`` on ``world_size`` ranks (default EP; ``tp``: attention's TP size, with
    sequence parallelism; ``etp``: the experts' TP size, None = ``tp``), every rank on its own
    share of the tokens; per run, the global tensors: outputs and input gradients concatenated
    over ranks, router gradients summed (as data-parallel reduction would), expert gradients
    by global index, summed over the ranks holding a replica of the expert, and stacked;
    counters summed."""
    per_rank = [pickle.loads(r) for r in run_distributed(
        _forward_backward, world_size=world_size or ep, tensor_parallel=tp, expert_parallel=ep,
        expert_tensor_parallel=etp, args=(runs,))]
    merged = []
    for results in zip(*per_rank):
        out = {"y": torch.cat([r["y"] for r in results]),
               "x_grad": torch.cat([r["x_grad"] for r in results]),
               "router": sum(r["router"] for r in results),
               "counters": {k: sum(r["counters"][k] for r in results)
                            for k in results[0]["counters"]},
               "rank_counters": [r["counters"] for r in results]}
        for key in GRAD_KEYS[1:]:
            by_index: dict[int, torch.Tensor] = {}
            for r in results:
                for i, g in r.get(key, {}).items():
                    by_index[i] = by_index[i] + g if i in by_index else g
            if by_index:
                out[key] = torch.stack([by_index[i] for i in sorted(by_index)])
        merged.append(out)
    return merged


def assert_matches(actual: dict, expected: dict, keys: tuple[str, ...], rel: float) -> None:
    """max |actual - expected| <= rel * max(1, max |expected|) for every key."""
    for key in keys:
        scale = max(1.0, expected[key].abs().max().item())
        err = (actual[key] - expected[key]).abs().max().item()
        assert err <= rel * scale, f"{key}: max error {err:.3g} (scale {scale:.3g})"


# Forced routings (E=8, k=2, G=4: groups of 2 experts; at EP=2 a rank holds 2 groups).
FORCED = Case(8, 2, 4, "softmax")
FORCED_NAMES = ("rank_idle", "one_group", "uneven")


def forced_run(name: str, dispatcher: str) -> Run:
    """``rank_idle``: every token selects experts 0..3 (experts 4..7, i.e. EP rank 1 of 2 and
    ranks 2, 3 of 4, receive nothing); ``one_group``: each token selects both experts of one
    group; ``uneven``: 3/4 of the tokens select group 0, the rest route freely."""
    weights = GroveWeights.random(8, 4, HIDDEN, FFN, ADJUGATE_FFN, seed=11)
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    if name == "rank_idle":
        x[:, 0] = 4.0
        weights.router[:4, 0], weights.router[4:, 0] = 0.0, -12.0
    else:
        groups = (torch.arange(NUM_TOKENS) % 4 if name == "one_group"
                  else torch.where(torch.arange(NUM_TOKENS) % 4 < 3, 0, -1))
        x[:, :4] = 0.0
        for token, group in enumerate(groups.tolist()):
            if group >= 0:
                x[token, group] = 4.0
        weights.router[:, :4] = -3.0
        weights.router[torch.arange(8), torch.arange(8) // 2] = 3.0
    cotangent = torch.randn(NUM_TOKENS, HIDDEN, generator=gen)
    return Run(FORCED, dispatcher, weights, x, cotangent, adjugate_scale=0.5)


# --------------------------------------------------------------------------------------
# routers
# --------------------------------------------------------------------------------------

ROUTER_EXPERTS = 8


def router_config(score_function: str = "softmax", rule: str = "paper", topk: int = 2,
                  aux_loss_coeff: float = 0.0, norm_topk_prob: bool = True,
                  bias_in_selection: bool = True, **megatron_fields: Any) -> GroveTransformerConfig:
    """A one-layer MoE config (hidden ``HIDDEN``, 8 experts) for router tests;
    ``megatron_fields`` set Megatron fields no YAML key reaches (to test refusals)."""
    config = transformer_config(
        model__num_layers=1, model__hidden_size=HIDDEN, model__num_attention_heads=1,
        moe__num_experts=ROUTER_EXPERTS, moe__ffn_hidden_size=8, moe__router_topk=topk,
        moe__router_score_function=score_function, moe__aux_loss_coeff=aux_loss_coeff,
        moe__bias_update_rule=rule, moe__norm_topk_prob=str(norm_topk_prob).lower(),
        moe__expert_bias_in_selection=str(bias_in_selection).lower())
    for name, value in megatron_fields.items():
        setattr(config, name, value)
    return config


def in_worker(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on one gloo rank with Megatron's groups; its result comes back by value."""
    def worker(rank: int) -> bytes:
        return pickle.dumps(fn())
    return pickle.loads(run_distributed(worker, world_size=1)[0])
