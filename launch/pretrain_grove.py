"""Pretrain a Grove MoE / MoE language model with Megatron-Core (torchrun entry point).

    python -m megatron_grove.launch --nproc-per-node 2 launch/pretrain_grove.py \
        --config configs/tiny_cpu.yaml parallel.expert_model_parallel_size=2 train.iters=50

(``megatron_grove.launch`` is torchrun with the job's own exit code; plain ``torchrun`` works
too and exits 1 whenever a worker failed.)

Rank, world size and rendezvous come from torchrun's environment only. Without torchrun it
runs as a single process (world size 1).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback

BAD_INPUT, NONFINITE = 2, 3  # exit codes (0 ok, 1 a collective failed; 4 preempted: see EPILOG)

EPILOG = """\
overrides: any number of dotted key=value pairs applied after the YAML file, values parsed
as YAML scalars, e.g.  train.iters=20 moe.router_score_function=sigmoid checkpoint.save=ckpt
main keys:
  train.iters / train.global_batch_size / train.micro_batch_size / train.seed / train.lr
  parallel.expert_model_parallel_size / parallel.tensor_model_parallel_size (TP > 1 with MoE
  needs parallel.sequence_parallel=true) / runtime.dtype (fp32|bf16)
  parallel.pipeline_model_parallel_size (stages, 1F1B) / parallel.virtual_pipeline_model_
  parallel_size (chunks per stage, interleaved) / parallel.num_layers_in_first_pipeline_stage
  and num_layers_in_last_pipeline_stage (layer counts that do not divide)
  moe.num_experts / moe.router_topk / moe.num_expert_groups / moe.adjugate_ffn_hidden_size
  moe.adjugate_scale / moe.router_score_function / moe.bias_update_rule / moe.bias_update_rate
  moe.token_dispatcher_type: auto (default: grove_hierarchical with expert groups, once per
  destination node across nodes and once per destination EP rank inside a node; alltoall
  without) | grove_hierarchical | grove_alltoall | alltoall | allgather
  parallel.ranks_per_node: ranks of one node for hierarchical dispatch (default: torchrun's
  LOCAL_WORLD_SIZE; set it to emulate nodes by groups of ranks)
  moe.norm_topk_prob (false: unnormalised top-k weights) / moe.expert_bias_in_selection (false:
  the bias is kept but neither selects nor is updated); a resumed run must keep the routing
  keys of its checkpoint (one-line error otherwise)
  data.path: a Megatron .bin/.idx prefix (tools/preprocess_data.py) or a weighted blend
  [[0.7,data/web],[0.3,data/books]]; default: the embedded corpus
  data.split (Megatron's "train,valid,test" shares of data.path's documents; default 98,2,0)
  or data.valid_path (separate validation prefix or blend; data.path is then trained on whole)
  train.eval_interval / train.eval_iters: validation loss every N steps and after the last, on
  the same eval_iters global batches each time (eval_iters=0: none)
  chat data (tools/preprocess_data.py --chat; docs/sft.md): loss on the assistant's tokens,
  conversations packed whole; train.per_token_loss=true: the mean over the global batch's loss
  tokens (Megatron's calculate_per_token_loss; configs/sft_*.yaml set it)
  logging.peak_tflops: per-device peak for MFU (default: bf16 peak of a known GPU; none on CPU)
  checkpoint.save / checkpoint.load (where a new run starts: a folder, or auto/null: from
  scratch) / checkpoint.save_interval / checkpoint.overwrite / logging.dir
  runtime.dist_timeout_s / train.max_skipped_steps
  a checkpoint resumes at another TP/EP/PP size, unless the distributed optimizer saved it with
  checkpoint.optimizer_format=dp_reshardable (default fully_reshardable)
  parallel.use_distributed_optimizer / parallel.recompute_granularity (none|selective|full)
multi-node: one torchrun per node with --rdzv-backend c10d (see docs/multinode.md and
  launch/slurm/pretrain_grove.sbatch); a rank whose peer dies stops with one line naming the
  failure, within runtime.dist_timeout_s
outputs (in logging.dir): metrics.jsonl (one JSON object per step: loss, val_loss/val_ppl when
  validated, tokens_per_s, model_flops_per_token, tflops_per_device, mfu, MoE counters) and
  tensorboard/; the samples drawn from each dataset are printed at start
layout check without GPUs:  python launch/pretrain_grove.py --config configs/grovemoe_33b_a3b.yaml --dry-run
  [--world-size 64] [parallel.expert_model_parallel_size=16]: parameters, memory per rank and the
  projected all-to-all time per MoE layer of each dispatcher, flat and hierarchical
long runs (docs/fault_tolerance.md):
  checkpoints carry a manifest (size + CRC-32 of every file), verified on load: a damaged one
  stops with one line naming the file; a run whose checkpoint.save already holds checkpoints
  resumes from the newest that verifies (checkpoint.load only starts a new run; set
  checkpoint.overwrite=true to start over there, deleting the newer checkpoints)
  a step with a non-finite loss or gradient on any rank is skipped (no update, no save);
  train.max_skipped_steps (default 10) in a row stop the run
  SIGTERM / SIGINT / SIGUSR1: finish the step, save, exit 4; a second signal exits at once
  (under torchrun give --shutdown-timeout enough for a step and a save; default 30 s; add
  --signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 for SIGUSR1); a worker whose
  torchrun dies gets SIGTERM
  before step 1: checkpoint.save and logging.dir writable, data.path's .bin/.idx consistent,
  tokenizer readable, runtime.device present
one run per folder: checkpoint.save and logging.dir hold a lock (.run.lock: host, pid, SLURM
  job, start); a second run refuses (exit 2); a dead run's lock is taken over, a silent one on
  another host after checkpoint.lock_stale_s; a requeued SLURM job takes its own back
stragglers: every logging.straggler_interval steps (default 50) the ranks exchange their own
  step times; a rank logging.straggler_factor x slower than the median for
  logging.straggler_intervals exchanges is named (stderr, metrics.jsonl "stragglers")
hangs: runtime.hang_timeout_s (default off): no step finished for that long -> every rank's
  stack in logging.dir/hang-rank{N}.txt, one line naming the ranks that did not reach the
  collective, exit 1
exit codes (of each process; under python -m megatron_grove.launch also the job's: the first
failing worker's; plain torchrun's own is 1 whenever a worker failed):
  0 ok
  1 a collective failed (a peer died, hung or the network failed; one line naming the rank
    that stopped first when known) or an unexpected error (traceback)
  2 bad input: configuration, pre-flight, a checkpoint that cannot load as asked, a full disk
    (one line on stderr saying which key or file and what to do)
  3 stopped: train.max_skipped_steps consecutive non-finite steps, or non-finite weights
  4 preempted by a signal: the checkpoint of the current step is saved; run the same command
  128+N  stopped by signal N without saving (no checkpoint.save, or a second signal)
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


def check_data(cfg) -> None:
    """The run's data sources exist and its split gives every part documents (ConfigError)."""
    from megatron_grove.data.tokenizer import load_tokenizer
    from megatron_grove.training.data import resolve_sources

    resolve_sources(cfg, load_tokenizer(cfg.data.tokenizer))


def _quiet_torch_cpp() -> None:
    """torch's C++ notices (e.g. gloo's on CPU); third-party Python banners are filtered by
    :mod:`megatron_grove.third_party_output` when ``megatron_grove`` is imported."""
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def _stop(rank: int, message: str, code: int) -> int:
    """This rank stops the job for an ordinary reason: tell the peers; the first rank to stop
    prints the one line (the others usually raised the same agreed error)."""
    from megatron_grove.runtime import announce_failure, destroy_parallel

    if announce_failure(rank, message):
        print(f"pretrain_grove.py: {message}", file=sys.stderr, flush=True)
    destroy_parallel()
    return code


def _collective_failed(rank: int, reason: str, cfg) -> None:
    """A collective failed under this rank: one line, after the cause when a peer announced
    one, then exit at once (a teardown would wait on the dead peers)."""
    from megatron_grove.runtime import first_failure

    cause = first_failure()
    if cause:
        why = f"{cause.split(':', 1)[0]} stopped the job (its error is above); stopping"
    else:
        resume = (f"run the same command again to resume from the last checkpoint in "
                  f"{cfg.checkpoint.save}" if cfg.checkpoint.save else
                  "set checkpoint.save and checkpoint.save_interval to be able to resume")
        why = (f"another rank died, hung past runtime.dist_timeout_s={cfg.runtime.dist_timeout_s}s "
               f"or the network failed; stopping. {resume}")
    print(f"pretrain_grove.py: rank {rank}: a collective failed ({reason}): {why}",
          file=sys.stderr, flush=True)
    from megatron_grove.job_exit import exit_now

    exit_now(1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_torch_cpp()
    from megatron_grove.config import ConfigError, load_config, validate_layout
    from megatron_grove.runtime import resolve_device
    from megatron_grove.runtime.acceleration import resolve_acceleration

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = load_config(args.config, args.overrides)
        if args.dry_run:
            return dry_run(cfg, args)
        validate_layout(cfg, world_size)
        resolve_device(cfg.runtime.device)  # runtime.device=cuda on a machine without a GPU
        resolve_acceleration(cfg)  # kernels / TE / FP8 requests this machine cannot serve
        check_data(cfg)  # missing datasets, split parts without documents
    except ConfigError as exc:
        if rank == 0:
            print(f"pretrain_grove.py: config error: {exc}", file=sys.stderr)
        else:  # torchrun stops every worker at the first exit: let rank 0 say why first
            time.sleep(5)
        return BAD_INPUT
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29511"),
                          RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

    from torch.distributed.checkpoint.api import CheckpointException

    from megatron_grove.checkpointing import CheckpointError
    from megatron_grove.runtime import (
        announce_failure,
        collective_failure,
        destroy_parallel,
        disk_full,
        signal_when_parent_dies,
    )
    from megatron_grove.training import train
    from megatron_grove.training.nonfinite import NonFiniteError
    from megatron_grove.training.preemption import Preempted, StopSignals

    try:
        with StopSignals(announce=rank == 0) as stop:
            if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun's worker: its death stops us too
                signal_when_parent_dies(signal.SIGTERM)
            summary = train(cfg, stop)
    except ConfigError as exc:  # pre-flight: agreed by every rank before step 1
        return _stop(rank, f"config error: {exc}", BAD_INPUT)
    except CheckpointError as exc:
        return _stop(rank, f"checkpoint error: {exc}", BAD_INPUT)
    except NonFiniteError as exc:
        return _stop(rank, f"non-finite training: {exc}", NONFINITE)
    except Preempted as exc:
        return _stop(rank, str(exc), exc.exit_code)
    except (Exception, CheckpointException) as exc:
        reason = collective_failure(exc)
        if reason is not None:
            _collective_failed(rank, reason, cfg)
        full = disk_full(exc)
        if full is not None:
            return _stop(rank, f"rank {rank}: {full}; free space there, then run the same "
                               "command to resume", BAD_INPUT)
        if isinstance(exc, OSError) and exc.filename:  # e.g. logging.dir removed mid-run
            return _stop(rank, f"rank {rank}: {exc.filename}: {exc.strerror}; fix that, then run "
                               "the same command to resume", BAD_INPUT)
        traceback.print_exc()  # a bug: the whole story, then the peers' lines
        sys.stderr.flush()
        announce_failure(rank, f"{type(exc).__name__}: {exc}")
        destroy_parallel()
        return 1
    destroy_parallel()
    if rank == 0 and summary.steps:
        losses = (f"loss {summary.first_loss:.4f} -> {summary.last_loss:.4f}"
                  if summary.first_loss is not None else "no finite loss")
        skipped = f" ({summary.skipped} skipped as non-finite)" if summary.skipped else ""
        last = summary.last_validation
        validation = (f", validation loss {last['val_loss']:.4f} (perplexity "
                      f"{last['val_ppl']:.2f})" if last else "")
        print(f"done: {summary.steps} steps, {losses}{skipped}{validation}; metrics in "
              f"{cfg.logging.dir}/metrics.jsonl")
    return 0


if __name__ == "__main__":
    code = main()
    from megatron_grove.job_exit import exit_now

    exit_now(code)  # skips the interpreter's teardown of torch and Megatron (seconds, nothing
    # left to write: files are closed, the process groups destroyed)
