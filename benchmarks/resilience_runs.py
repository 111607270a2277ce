"""What the safety of long runs costs, measured on real runs.

* :func:`run_checksum_benchmark`: one training state (model + Adam state after one step) of a
  config saved ``repeats`` times by ``nproc`` spawned processes; per save the time of the whole
  save, of its manifest (hashing every file, as inside the save), of checking the manifest
  and of the load itself (each the slowest rank's).
* :func:`run_async_save_benchmark`: the same state saved synchronously, then asynchronously
  (``checkpoint.async_save``) while emulated training steps go on: the training stall of the
  asynchronous save (its call and the per-step polls, publication included) against the
  synchronous save's time.
* :func:`measure_rss`: a real ``torchrun`` of ``launch/pretrain_grove.py``; the resident set
  of every worker sampled every ``interval_s`` with the step the run had reached.
* :func:`measure_signal_to_exit`: the same run sent a signal after some steps: the seconds
  from the signal to the workers' and to the launcher's exit, and the step saved.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_grove.benchmarking.processes import cpu_threads_per_rank, run_on_ranks

__all__ = ["ChecksumBenchmark", "run_checksum_benchmark", "format_checksum_table",
           "AsyncSaveBenchmark", "run_async_save_benchmark", "format_async_save_table",
           "measure_rss", "measure_signal_to_exit"]

LAUNCHER = Path(__file__).resolve().parents[1] / "launch" / "pretrain_grove.py"


@dataclass
class ChecksumBenchmark:
    config: str
    overrides: list[str] = field(default_factory=list)
    nproc: int = 2  # processes (EP = nproc unless the overrides set it)
    repeats: int = 3
    folder: str | None = None  # where to save (default: a temporary folder)


def _slowest(seconds: float) -> float:
    import torch.distributed as dist

    value = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _timed(fn) -> float:
    import torch.distributed as dist

    dist.barrier()
    began = time.perf_counter()
    fn()
    return _slowest(time.perf_counter() - began)


def _training_state(rank: int, init_method: str, bench):
    """Collective: this rank's run of ``bench.config`` (+ overrides) at EP = ``bench.nproc``,
    after one zero-gradient optimizer step, so Adam state exists as in a real checkpoint ->
    (config, training setup)."""
    from megatron_grove.config import load_config
    from megatron_grove.runtime import initialize_parallel
    from megatron_grove.training import setup_training

    torch.set_num_threads(cpu_threads_per_rank(bench.nproc))
    cfg = load_config(bench.config, [f"parallel.expert_model_parallel_size={bench.nproc}",
                                     *bench.overrides])
    p = cfg.parallel
    runtime = initialize_parallel(p.tensor_model_parallel_size, p.expert_model_parallel_size,
                                  device="cpu", init_method=init_method, rank=rank,
                                  world_size=bench.nproc, timeout_s=3600)
    setup = setup_training(cfg, runtime)
    setup.model.zero_grad_buffer()
    setup.optimizer.step()
    return cfg, setup


def _checksum_worker(rank: int, init_method: str, bench: ChecksumBenchmark,
                     folder: str) -> list[dict]:
    from megatron_grove.checkpointing import (
        TrainState,
        checkpoint_dir,
        load_checkpoint,
        save_checkpoint,
        verify_checkpoint,
    )
    from megatron_grove.checkpointing.manifest import write_manifest
    from megatron_grove.config import config_to_dict
    from megatron_grove.runtime import destroy_parallel

    cfg, setup = _training_state(rank, init_method, bench)
    model, optimizer = setup.model, setup.optimizer
    rows = []
    for step in range(1, bench.repeats + 1):
        state = TrainState(step=step, consumed_samples=0,
                           scheduler=setup.scheduler.state_dict(), config=config_to_dict(cfg))
        target = checkpoint_dir(folder, step)
        save_s = _timed(lambda: save_checkpoint(folder, model, optimizer, state))
        manifest_s = _timed(lambda: write_manifest(target))
        verify_s = _timed(lambda: verify_checkpoint(target))
        load_s = _timed(lambda: load_checkpoint(target, model, optimizer, verify=False))
        size = sum(f.stat().st_size for f in Path(target).rglob("*") if f.is_file())
        rows.append({"save_s": save_s, "manifest_s": manifest_s, "verify_s": verify_s,
                     "load_s": load_s, "bytes": size})
    destroy_parallel()
    return rows


def run_checksum_benchmark(bench: ChecksumBenchmark) -> dict:
    """Spawn ``bench.nproc`` CPU processes, save/verify/load, return the medians."""
    with tempfile.TemporaryDirectory() as tmp:
        payload = run_on_ranks(_checksum_worker, bench.nproc, bench,
                               bench.folder or os.path.join(tmp, "ckpt"))
    median = {key: statistics.median(row[key] for row in payload)
              for key in ("save_s", "manifest_s", "verify_s", "load_s")}
    return {"benchmark": asdict(bench), "runs": payload, "bytes": payload[0]["bytes"], **median,
            "manifest_pct_of_save": 100 * median["manifest_s"] / median["save_s"],
            "verify_pct_of_load": 100 * median["verify_s"] / median["load_s"]}


def format_checksum_table(summary: dict) -> str:
    rows = [("checkpoint size", f"{summary['bytes'] / 2**20:.1f} MiB "
                                f"({summary['benchmark']['nproc']} processes)"),
            ("save, manifest included (median)", f"{summary['save_s']:.3f} s"),
            ("  of which the manifest (hashing)",
             f"{summary['manifest_s']:.3f} s ({summary['manifest_pct_of_save']:.1f} %)"),
            ("load (median)", f"{summary['load_s']:.3f} s"),
            ("checking the manifest before it",
             f"{summary['verify_s']:.3f} s ({summary['verify_pct_of_load']:.1f} % of the load)")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


@dataclass
class AsyncSaveBenchmark:
    config: str
    overrides: list[str] = field(default_factory=list)
    nproc: int = 2  # processes (EP = nproc unless the overrides set it)
    repeats: int = 3
    step_s: float = 0.25  # the training step the writes overlap (each followed by a poll)
    folder: str | None = None


def _async_save_worker(rank: int, init_method: str, bench: AsyncSaveBenchmark,
                       folder: str) -> list[dict]:
    import shutil

    import torch.distributed as dist

    from megatron_grove.checkpointing import TrainState, checkpoint_dir, save_checkpoint
    from megatron_grove.checkpointing.async_save import AsyncCheckpointSaver
    from megatron_grove.config import config_to_dict
    from megatron_grove.runtime import destroy_parallel

    cfg, setup = _training_state(rank, init_method, bench)
    model, optimizer = setup.model, setup.optimizer

    def state(step: int) -> TrainState:
        return TrainState(step=step, consumed_samples=0,
                          scheduler=setup.scheduler.state_dict(), config=config_to_dict(cfg))

    saver = AsyncCheckpointSaver()
    rows = []
    for i in range(bench.repeats):
        sync_step, async_step = 2 * i + 1, 2 * i + 2
        sync_s = _timed(lambda: save_checkpoint(folder, model, optimizer, state(sync_step)))
        dist.barrier()
        began = time.perf_counter()
        call_s = _timed(lambda: saver.save(folder, model, optimizer, state(async_step),
                                           cfg.checkpoint.optimizer_format))
        polls, steps, publishing = 0.0, 0, 0.0
        while saver.pending_step is not None:
            time.sleep(bench.step_s)  # the next training step
            steps += 1
            polled = time.perf_counter()
            saver.poll()
            polls += time.perf_counter() - polled
            if saver.pending_step is None:  # this poll finalised and published the write
                publishing = time.perf_counter() - polled
        publish_s = _slowest(polls)
        finalize_s = _slowest(publishing)
        until_published = _slowest(time.perf_counter() - began)
        size = sum(f.stat().st_size for f in checkpoint_dir(folder, async_step).rglob("*")
                   if f.is_file())
        rows.append({"sync_save_s": sync_s, "async_call_s": call_s, "async_polls_s": publish_s,
                     "async_finalize_s": finalize_s,
                     "async_stall_s": call_s + publish_s, "async_published_after_s":
                     until_published, "steps_overlapped": steps, "bytes": size})
        dist.barrier()
        if rank == 0:  # keep the disk use to two checkpoints
            for step in (sync_step, async_step):
                shutil.rmtree(checkpoint_dir(folder, step), ignore_errors=True)
        dist.barrier()
    destroy_parallel()
    return rows


def run_async_save_benchmark(bench: AsyncSaveBenchmark) -> dict:
    """Spawn ``bench.nproc`` CPU processes; per repeat a synchronous save, then an asynchronous
    one overlapping emulated steps of ``bench.step_s`` (a poll after each): the training stall
    of the async save (its call plus the polls, publishing included; the slowest rank's)
    against the synchronous save's time; medians."""
    with tempfile.TemporaryDirectory() as tmp:
        payload = run_on_ranks(_async_save_worker, bench.nproc, bench,
                               bench.folder or os.path.join(tmp, "ckpt"))
    keys = ("sync_save_s", "async_call_s", "async_polls_s", "async_finalize_s",
            "async_stall_s", "async_published_after_s")
    median = {key: statistics.median(row[key] for row in payload) for key in keys}
    return {"benchmark": asdict(bench), "runs": payload, "bytes": payload[0]["bytes"], **median,
            "stall_pct_of_sync_save": 100 * median["async_stall_s"] / median["sync_save_s"]}


def format_async_save_table(summary: dict) -> str:
    rows = [("checkpoint size", f"{summary['bytes'] / 2**20:.1f} MiB "
                                f"({summary['benchmark']['nproc']} processes)"),
            ("synchronous save (median)", f"{summary['sync_save_s']:.3f} s"),
            ("async save: the call (plan, common state, fork)", f"{summary['async_call_s']:.3f} s"),
            ("async save: polls until published (one a step)",
             f"{summary['async_polls_s']:.3f} s"),
            ("  of which the finalising poll (metadata, manifest, rename)",
             f"{summary['async_finalize_s']:.3f} s"),
            ("async save: training stall", f"{summary['async_stall_s']:.3f} s "
                                           f"({summary['stall_pct_of_sync_save']:.1f} % of the "
                                           "synchronous save)"),
            ("async save: published after", f"{summary['async_published_after_s']:.3f} s")]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _workers(launcher: subprocess.Popen) -> list[int]:
    tasks = Path(f"/proc/{launcher.pid}/task")
    return sorted(int(c) for task in tasks.iterdir()
                  for c in (task / "children").read_text().split())


def _last_step(metrics: Path) -> int:
    """The step of the last complete line of ``metrics`` (0 if none), read from its end."""
    if not metrics.is_file():
        return 0
    with open(metrics, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 20)))
        lines = f.read().split(b"\n")
    for line in reversed(lines[:-1]):
        try:
            return int(line.split(b'"step": ', 1)[1].split(b",", 1)[0])
        except (IndexError, ValueError):
            continue
    return 0


def _torchrun(config: str, overrides: list[str], nproc: int, log_dir: str, **popen):
    port = 20000 + os.getpid() % 20000
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", str(LAUNCHER),
           "--config", config, "logging.progress_bar=false", f"logging.dir={log_dir}",
           *overrides]
    return subprocess.Popen(cmd, **popen)


def measure_rss(config: str, overrides: list[str], nproc: int, interval_s: float,
                log_dir: str) -> list[dict]:
    """Run the config under torchrun; every ``interval_s`` one sample ``{"t_s", "step",
    "rss_mib": [per worker]}`` until the run ends."""
    samples = []
    launcher = _torchrun(config, overrides, nproc, log_dir, stdout=subprocess.DEVNULL)
    began = time.monotonic()
    while launcher.poll() is None:
        workers = _workers(launcher)
        rss = [_rss_mib(pid) for pid in workers]
        if rss and None not in rss:
            samples.append({"t_s": time.monotonic() - began,
                            "step": _last_step(Path(log_dir) / "metrics.jsonl"), "rss_mib": rss})
        time.sleep(interval_s)
    if launcher.returncode != 0:
        raise RuntimeError(f"the run failed (exit code {launcher.returncode})")
    return samples


def measure_signal_to_exit(config: str, overrides: list[str], nproc: int, after_steps: int,
                           sig: int, log_dir: str) -> dict:
    """Send ``sig`` to the launcher once the run logged ``after_steps`` steps; the seconds until
    every worker and the launcher exited, and the step the run stopped after."""
    launcher = _torchrun(config, overrides, nproc, log_dir, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    metrics = Path(log_dir) / "metrics.jsonl"
    while _last_step(metrics) < after_steps:
        if launcher.poll() is not None:
            raise RuntimeError(f"the run ended before step {after_steps}")
        time.sleep(0.05)
    workers = _workers(launcher)
    at_step = _last_step(metrics)
    sent = time.monotonic()
    launcher.send_signal(sig)
    while any(Path(f"/proc/{pid}").exists() and _rss_mib(pid) is not None for pid in workers):
        time.sleep(0.01)
    workers_s = time.monotonic() - sent
    launcher.wait()
    return {"signal": signal.Signals(sig).name, "signalled_after_step": at_step,
            "stopped_after_step": _last_step(metrics), "workers_exit_s": workers_s,
            "launcher_exit_s": time.monotonic() - sent, "launcher_exit_code": launcher.returncode}


def measure_straggler_exchange(config: str, overrides: list[str], nproc: int,
                               log_dir: str) -> dict:
    """The cost of the straggler exchange: the config run with an exchange after every step
    (``logging.straggler_interval=1``) and without (``=0``), one after the other. Medians of
    ``straggler_exchange_s`` and of ``step_time_s`` (which the exchange is not part of; the
    timing of collectives is), and the exchange's share of a step at the default interval."""
    import statistics

    from megatron_grove.config import LoggingConfig
    from megatron_grove.training.metrics import read_metrics

    runs = {}
    for interval in (1, 0):
        folder = Path(log_dir) / f"interval{interval}"
        launcher = _torchrun(config, [*overrides, f"logging.straggler_interval={interval}"],
                             nproc, str(folder), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        if launcher.wait() != 0:
            raise RuntimeError(f"the run failed (exit code {launcher.returncode})")
        runs[interval] = read_metrics(folder / "metrics.jsonl")[2:]  # past the warm-up steps
    exchange = statistics.median(r["straggler_exchange_s"] for r in runs[1])
    step = statistics.median(r["step_time_s"] for r in runs[1])
    plain = statistics.median(r["step_time_s"] for r in runs[0])
    every = LoggingConfig().straggler_interval
    return {"steps": len(runs[1]), "exchange_s": exchange, "step_s": step,
            "step_s_without_detector": plain, "exchange_per_step_of_a_step": exchange / step,
            f"exchange_share_at_interval_{every}": exchange / every / step,
            "step_time_ratio_with_over_without": step / plain}
