"""The training-step benchmark: whole steps (forward, backward, optimizer) of one model on the
same data with four MoE variants, on ``ep`` processes.

    (a) ``plain``:       the same routed MoE without adjugates (``moe.num_expert_groups=0``:
                         Megatron's ``MoELayer`` on Megatron's all-to-all);
    (b) ``virtual``:     Grove, adjugates as extra experts of Megatron's all-to-all
                         (``moe.token_dispatcher_type=alltoall``);
    (c) ``group_aware``: Grove on ``GroupAwareAlltoAllDispatcher`` (``grove_alltoall``);
    (d) ``hierarchical``: Grove on ``GroveHierarchicalDispatcher`` (``grove_hierarchical``: once
                         per (token, node) across nodes; nodes = ``parallel.ranks_per_node`` or
                         torchrun's ``LOCAL_WORLD_SIZE``, else one node, where it is (c)).

Each process builds the four runs with :func:`megatron_grove.training.setup_training` (model in
Megatron DDP, optimizer, LR schedule, dataset) and then runs them interleaved, ``a, b, c, d, b,
c, d, a, ...`` (:func:`~megatron_grove.benchmarking.processes.rotated`), so that a change in the
machine's load hits the four alike. Repetition ``i`` of every
variant trains on step ``i``'s global batch. A step is what :func:`megatron_grove.training.train`
does per step: zero the gradient buffers, Megatron's forward/backward schedule over the
micro-batches, the optimizer and LR steps and the expert-bias update; its time is the slowest
rank's. (b) and (c) are the same function of the same weights, so their losses agree (reported).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from megatron_grove.benchmarking.processes import (
    LinkMeter,
    cpu_threads_per_rank,
    rotated,
    run_on_ranks,
)
from megatron_grove.config import ConfigError, GroveConfig, load_config, validate_layout

__all__ = ["VARIANTS", "TrainStepBenchmark", "variant_configs", "run_train_step_benchmark",
           "run_train_step_rank", "summarize_train_step", "format_train_step_table"]

VARIANTS = ("plain", "virtual", "group_aware", "hierarchical")

_VARIANT_OVERRIDES = {
    "plain": ["moe.num_expert_groups=0", "moe.token_dispatcher_type=alltoall"],
    "virtual": ["moe.token_dispatcher_type=alltoall"],
    "group_aware": ["moe.token_dispatcher_type=grove_alltoall"],
    "hierarchical": ["moe.token_dispatcher_type=grove_hierarchical"],
}


@dataclass
class TrainStepBenchmark:
    """One setting: a YAML config with dotted overrides, on ``ep`` expert-parallel ranks."""

    config: str
    overrides: list[str] = field(default_factory=list)
    ep: int = 2
    steps: int = 5  # timed repetitions of each variant
    warmup: int = 1  # untimed repetitions of each variant first
    device: str = "cpu"  # cpu (gloo) | cuda (NCCL, one GPU per rank)
    # emulated cluster: the node's link device, whose kernel tx counter the node's first rank
    # reads around every step (benchmarks/emulated_cluster.py)
    link_device: str | None = None


def variant_configs(bench: TrainStepBenchmark) -> dict[str, GroveConfig]:
    """The four runs' configs (``ConfigError`` if the setting is not valid): the benchmark's
    config and overrides, EP = ``bench.ep``, nothing written (no checkpoint, no TensorBoard,
    no progress bar), at least ``warmup + steps`` iterations of data, then each variant's
    dispatcher and groups."""
    common = [*bench.overrides, f"parallel.expert_model_parallel_size={bench.ep}",
              f"runtime.device={bench.device}", "checkpoint.save=null", "checkpoint.load=null",
              "logging.tensorboard=false", "logging.progress_bar=false"]
    base = load_config(bench.config, common)
    if not base.moe.num_experts or not base.moe.num_expert_groups:
        raise ConfigError(f"moe.num_experts={base.moe.num_experts}, moe.num_expert_groups="
                          f"{base.moe.num_expert_groups}: the benchmark compares Grove MoE "
                          "layers; set both > 0")
    needed = bench.warmup + bench.steps
    if base.train.iters < needed:  # the dataset holds train.iters global batches
        common += [f"train.iters={needed}", "train.lr_warmup_iters=0"]
    configs = {v: load_config(bench.config, common + _VARIANT_OVERRIDES[v]) for v in VARIANTS}
    for cfg in configs.values():
        validate_layout(cfg, world_size(cfg))
    return configs


def world_size(cfg: GroveConfig) -> int:
    """Processes of a run of ``cfg`` with data parallelism only across its EP ranks."""
    return cfg.parallel.tensor_model_parallel_size * cfg.parallel.expert_model_parallel_size


def _timed_step(setup, cfg: GroveConfig, batches: list, forward_step,
                device: torch.device, link: LinkMeter) -> tuple[float, float, float, int]:
    """One training step of ``setup`` on ``batches``: the slowest rank's wall-clock seconds
    and CPU seconds (the process's, all threads), the step's loss (``StepLoss.value``) and the
    bytes this node's link sent during the step (0 without a link; see :class:`LinkMeter`)."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_grove.moe.balancing import update_expert_bias
    from megatron_grove.moe.counters import reset_moe_counters
    from megatron_grove.training.loss import reduce_step_loss
    from megatron_grove.training.step import last_stage_losses

    t = cfg.train
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.synchronize()
    link.start()
    began, cpu_began = time.perf_counter(), time.process_time()
    setup.model.zero_grad_buffer()
    setup.optimizer.zero_grad()
    reset_moe_counters(setup.model)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[setup.model],
        num_microbatches=len(batches), seq_length=cfg.model.seq_length,
        micro_batch_size=t.micro_batch_size, forward_only=False)
    setup.optimizer.step()
    setup.scheduler.step(increment=1)
    update_expert_bias([setup.model], cfg.moe.bias_update_rule, cfg.moe.bias_update_rate)
    if device.type == "cuda":
        torch.cuda.synchronize()
    spent = torch.tensor([time.perf_counter() - began, time.process_time() - cpu_began],
                         dtype=torch.float64)
    sent = link.stop()
    dist.all_reduce(spent, op=dist.ReduceOp.MAX)
    loss = reduce_step_loss(last_stage_losses(losses, len(batches), device),
                            t.per_token_loss).value
    return float(spent[0]), float(spent[1]), loss, sent


def _worker(rank: int, init_method: str, bench: TrainStepBenchmark,
            configs: dict[str, GroveConfig]) -> dict | None:
    import torch.distributed as dist

    from megatron_grove.moe.counters import collect_moe_counters
    from megatron_grove.runtime import destroy_parallel, initialize_parallel
    from megatron_grove.training import micro_batches, setup_training
    from megatron_grove.training.step import forward_step_func

    first = configs["group_aware"]
    p, t = first.parallel, first.train
    runtime = initialize_parallel(p.tensor_model_parallel_size, p.expert_model_parallel_size,
                                  seed=t.seed, device=bench.device, init_method=init_method,
                                  rank=rank, world_size=world_size(first), timeout_s=600,
                                  ranks_per_node=p.ranks_per_node)
    device = runtime.device
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads_per_rank(world_size(first)))
    setups = {v: setup_training(configs[v], runtime) for v in VARIANTS}
    forward_step = forward_step_func(first, device)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu_times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    losses: dict[str, list[float]] = {v: [] for v in VARIANTS}
    link, link_bytes = LinkMeter(bench.link_device), {v: 0 for v in VARIANTS}
    counters: dict[str, dict] = {}
    for step in range(1, bench.warmup + bench.steps + 1):
        setup = setups["group_aware"]
        batches = micro_batches(setup.dataset, step, t.global_batch_size, t.micro_batch_size,
                                setup.dp_rank, setup.dp_size)
        for variant in rotated(VARIANTS, step):  # interleaved, the order rotating
            elapsed, cpu, loss, sent = _timed_step(setups[variant], configs[variant], batches,
                                                   forward_step, device, link)
            losses[variant].append(loss)
            if step > bench.warmup:
                times[variant].append(elapsed)
                cpu_times[variant].append(cpu)
                link_bytes[variant] += sent
            if step == bench.warmup + bench.steps:
                counters[variant] = collect_moe_counters(
                    setups[variant].model, t.global_batch_size * first.model.seq_length)
    totals = torch.tensor([link_bytes[v] for v in VARIANTS], dtype=torch.float64)
    dist.all_reduce(totals)
    destroy_parallel()
    if rank:
        return None
    return {"times": times, "cpu_times": cpu_times, "losses": losses, "counters": counters,
            "device": str(device),
            "link_bytes": {v: float(b) / bench.steps for v, b in zip(VARIANTS, totals)}}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def run_train_step_benchmark(bench: TrainStepBenchmark) -> dict:
    """Run the four variants interleaved on ``world_size`` spawned processes; the summary:
    median step time per variant with its spread (min, max) and the ratios, the losses, the
    copies per token, the machine's load average before and after."""
    configs = variant_configs(bench)
    load_before = os.getloadavg()[0]
    out = run_on_ranks(_worker, world_size(configs["group_aware"]), bench, configs)
    return summarize_train_step(bench, configs, out, load_before)


def run_train_step_rank(bench: TrainStepBenchmark) -> dict | None:
    """This process's part of the benchmark when a launcher (torchrun) started it: rank and
    rendezvous from the environment; rank 0 returns the raw result for
    :func:`summarize_train_step`, the others ``None``."""
    return _worker(int(os.environ["RANK"]), "env://", bench, variant_configs(bench))


def summarize_train_step(bench: TrainStepBenchmark, configs: dict[str, GroveConfig], out: dict,
                         load_before: float) -> dict:
    """Rank 0's raw result as the summary (see :func:`run_train_step_benchmark`), with a link
    device the bytes that crossed the links per step (kernel counters)."""
    times, losses = out["times"], out["losses"]
    median = {v: statistics.median(times[v]) for v in VARIANTS}
    cpu = {v: statistics.median(out["cpu_times"][v]) for v in VARIANTS}
    cfg = configs["group_aware"]
    return {
        "config": {"config": bench.config, "overrides": bench.overrides, "ep": bench.ep,
                   "steps": bench.steps, "warmup": bench.warmup,
                   "experts": cfg.moe.num_experts, "topk": cfg.moe.router_topk,
                   "groups": cfg.moe.num_expert_groups, "hidden": cfg.model.hidden_size,
                   "ffn": cfg.moe.ffn_hidden_size,
                   "adjugate_ffn": cfg.moe.adjugate_ffn_hidden_size,
                   "tokens_per_step": cfg.train.global_batch_size * cfg.model.seq_length},
        "device": f"{out['device']} x {world_size(cfg)} "
                  f"({'nccl' if out['device'].startswith('cuda') else 'gloo'})",
        "load_average": [load_before, os.getloadavg()[0]],
        "step_time_s": median,
        "step_time_spread_s": {v: [min(times[v]), max(times[v])] for v in VARIANTS},
        "step_times_s": times,
        "ratio_group_aware_vs_virtual": median["group_aware"] / median["virtual"],
        "ratio_group_aware_vs_plain": median["group_aware"] / median["plain"],
        # CPU seconds (slowest rank, median): less sensitive to a loaded machine than wall time
        "step_cpu_s": cpu,
        "cpu_ratio_group_aware_vs_virtual": cpu["group_aware"] / cpu["virtual"],
        "cpu_ratio_group_aware_vs_plain": cpu["group_aware"] / cpu["plain"],
        "ratio_hierarchical_vs_group_aware": median["hierarchical"] / median["group_aware"],
        "losses": losses,
        "loss_max_abs_diff_virtual_vs_group_aware": max(
            abs(a - b) for a, b in zip(losses["virtual"], losses["group_aware"])),
        "copies_per_token": {v: _mean(out["counters"][v].get("copies_sent_per_token", []))
                             for v in VARIANTS[1:]},
        "adjugate_evals_per_token": {
            v: _mean(out["counters"][v].get("adjugate_evals_per_token", []))
            for v in VARIANTS[1:]},
        **({"link_bytes": out["link_bytes"]} if bench.link_device else {}),
    }


def format_train_step_table(summary: dict) -> str:
    c = summary["config"]
    lines = [f"EP={c['ep']} E={c['experts']} k={c['topk']} G={c['groups']} H={c['hidden']} "
             f"FFN={c['ffn']} adjugate FFN={c['adjugate_ffn']} tokens/step="
             f"{c['tokens_per_step']} on {summary['device']}, {c['steps']} steps "
             f"(+{c['warmup']} warm-up) interleaved",
             f"{'variant':<12} {'step s median':>13} {'min..max':>15} {'CPU s':>7} "
             f"{'copies/token':>12} {'last loss':>10}"]
    for v in VARIANTS:
        low, high = summary["step_time_spread_s"][v]
        copies = summary["copies_per_token"].get(v)
        lines.append(f"{v:<12} {summary['step_time_s'][v]:>13.4f} {low:>7.3f}..{high:<7.3f} "
                     f"{summary['step_cpu_s'][v]:>7.4f} "
                     f"{'-' if copies is None else f'{copies:.3f}':>12} "
                     f"{summary['losses'][v][-1]:>10.5f}")
    lines.append(f"ratios: group_aware / virtual {summary['ratio_group_aware_vs_virtual']:.3f} "
                 f"(CPU {summary['cpu_ratio_group_aware_vs_virtual']:.3f}), group_aware / plain "
                 f"{summary['ratio_group_aware_vs_plain']:.3f} (CPU "
                 f"{summary['cpu_ratio_group_aware_vs_plain']:.3f}); losses "
                 f"virtual vs group_aware differ by at most "
                 f"{summary['loss_max_abs_diff_virtual_vs_group_aware']:.2e}; load average "
                 f"{summary['load_average'][0]:.1f} -> {summary['load_average'][1]:.1f}")
    return "\n".join(lines)
