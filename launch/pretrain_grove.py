"""Pretrain a Grove MoE / MoE language model with Megatron-Core (torchrun entry point).

    torchrun --nproc-per-node 2 launch/pretrain_grove.py --config configs/tiny_cpu.yaml \
        parallel.expert_model_parallel_size=2 train.iters=50

Rank, world size and rendezvous come from torchrun's environment only. Without torchrun it
runs as a single process (world size 1).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

EPILOG = """\
overrides: any number of dotted key=value pairs applied after the YAML file, values parsed
as YAML scalars, e.g.  train.iters=20 moe.router_score_function=sigmoid checkpoint.save=ckpt
main keys:
  train.iters / train.global_batch_size / train.micro_batch_size / train.seed / train.lr
  parallel.expert_model_parallel_size / parallel.tensor_model_parallel_size (TP > 1 with MoE
  needs parallel.sequence_parallel=true) / runtime.dtype (fp32|bf16)
  moe.num_experts / moe.router_topk / moe.num_expert_groups / moe.adjugate_ffn_hidden_size
  moe.adjugate_scale / moe.router_score_function / moe.bias_update_rule / moe.bias_update_rate
  moe.token_dispatcher_type: auto (default: grove_alltoall with expert groups, once per
  destination EP rank; alltoall without) | grove_alltoall | alltoall | allgather
  data.path (Megatron .bin/.idx prefix from tools/preprocess_data.py; default: embedded corpus)
  checkpoint.save / checkpoint.load (a folder, or auto: checkpoint.save if it holds a
  checkpoint) / checkpoint.save_interval / logging.dir / runtime.dist_timeout_s
  a checkpoint resumes at another TP/EP size, unless the distributed optimizer saved it with
  checkpoint.optimizer_format=dp_reshardable (default fully_reshardable)
  parallel.use_distributed_optimizer / parallel.recompute_granularity (none|selective|full)
multi-node: one torchrun per node with --rdzv-backend c10d (see docs/multinode.md and
  launch/slurm/pretrain_grove.sbatch); a rank whose peer dies stops with one line naming the
  failure, within runtime.dist_timeout_s
outputs (in logging.dir): metrics.jsonl (one JSON object per step) and tensorboard/
layout check without GPUs:  python launch/pretrain_grove.py --config configs/grovemoe_33b_a3b.yaml --dry-run
  [--world-size 64] [parallel.expert_model_parallel_size=16]: parameters, memory per rank and the
  projected all-to-all time per MoE layer of each dispatcher, flat and hierarchical
exit codes: 0 ok, 2 bad configuration (one line on stderr saying which key and what is allowed)
  or a checkpoint that cannot load as asked (one line saying why)
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain_grove.py", description=__doc__.split("\n\n")[0],
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run configuration (see configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted overrides of config keys")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the model on the meta device (nothing allocated) and print "
                             "total / activated parameters and per-rank parameter memory for the "
                             "configured layout; needs no GPU and no torchrun")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="with --dry-run: ranks of the planned job (nodes x GPUs per node); "
                             "default: TP x PP x EP (one expert-parallel group)")
    parser.add_argument("--json", action="store_true",
                        help="with --dry-run: print the plan as one JSON object on the last line")
    links = parser.add_argument_group(
        "all-to-all projection (with --dry-run; defaults: DeepEP's published H800 figures)")
    links.add_argument("--gpus-per-node", type=int, default=8, metavar="N",
                       help="GPUs per node; an EP group of more ranks spans nodes (default 8)")
    links.add_argument("--nvlink-gbps", type=float, default=153.0, metavar="GB/S",
                       help="intranode bandwidth per GPU and direction (default 153)")
    links.add_argument("--rdma-gbps", type=float, default=50.0, metavar="GB/S",
                       help="internode bandwidth per GPU and direction (default 50)")
    return parser.parse_args(argv)


def dry_run(cfg, args: argparse.Namespace) -> int:
    """Plan the configured model in a private single-process world (any machine)."""
    import json

    from megatron_grove.config import ConfigError, validate_layout
    from megatron_grove.planner import format_plan, plan_memory, plan_parameters
    from megatron_grove.planner.dispatch_time import Links, format_projection, project_run
    from megatron_grove.runtime import single_process_world

    p = cfg.parallel
    world = args.world_size or (p.tensor_model_parallel_size * p.pipeline_model_parallel_size
                                * p.expert_model_parallel_size)
    validate_layout(cfg, world)
    links = Links(args.gpus_per_node, args.nvlink_gbps, args.rdma_gbps)
    if cfg.moe.num_experts and links.problems(p.expert_model_parallel_size):
        raise ConfigError(f"--gpus-per-node {args.gpus_per_node}, --nvlink-gbps "
                          f"{args.nvlink_gbps:g}, --rdma-gbps {args.rdma_gbps:g}: "
                          + "; ".join(links.problems(p.expert_model_parallel_size)))
    with single_process_world(device="cpu"):
        plan = plan_parameters(cfg)
    memory = plan_memory(cfg, plan, world)
    projection = project_run(cfg, plan.moe_layers, world, links) if cfg.moe.num_experts else None
    print(format_plan(plan, memory))
    if projection is not None:
        print(format_projection(projection))
    if args.json:
        print(json.dumps({**plan.as_dict(), "memory": memory.as_dict(),
                          "dispatch_projection": projection}))
    return 0


def _quiet_dependency_warnings() -> None:
    """Megatron and torch warn at import that TE/Apex/CUDA are absent; on CPU that is expected."""
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_dependency_warnings()
    from megatron_grove.config import ConfigError, load_config, validate_layout
    from megatron_grove.runtime.acceleration import resolve_acceleration

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, args)
        validate_layout(cfg, world_size)
        resolve_acceleration(cfg)  # kernels / TE / FP8 requests this machine cannot serve
    except ConfigError as exc:
        if rank == 0:
            print(f"pretrain_grove.py: config error: {exc}", file=sys.stderr)
        return 2
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

    from megatron_grove.checkpointing import CheckpointError
    from megatron_grove.runtime import collective_failure, destroy_parallel
    from megatron_grove.training import train

    try:
        records = train(cfg)
    except CheckpointError as exc:  # raised alike on every rank, before any training step
        destroy_parallel()
        if rank == 0:
            print(f"pretrain_grove.py: checkpoint error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        reason = collective_failure(exc)
        if reason is None:
            destroy_parallel()
            raise
        resume = (f"restart the job to resume from the last checkpoint in {cfg.checkpoint.save} "
                  "(checkpoint.load=auto)" if cfg.checkpoint.save else
                  "set checkpoint.save and checkpoint.save_interval to be able to resume")
        print(f"pretrain_grove.py: rank {rank}: a collective failed ({reason}): another rank "
              f"died, hung past runtime.dist_timeout_s={cfg.runtime.dist_timeout_s}s or the network "
              f"failed; stopping. {resume}", file=sys.stderr, flush=True)
        os._exit(1)  # no teardown: it would wait on the dead peers
    destroy_parallel()
    if rank == 0 and records:
        print(f"done: {len(records)} steps, loss {records[0]['loss']:.4f} -> "
              f"{records[-1]['loss']:.4f}; metrics in {cfg.logging.dir}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
