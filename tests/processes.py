"""Running test code elsewhere: on forked gloo ranks (:func:`run_distributed`, :func:`in_world`,
:func:`in_worker`), in child processes (:func:`run_script`, :func:`run_python`) and under real
torchrun (:func:`torchrun`), and reading what they left (:func:`losses`, process lookups).

Every child process started here runs on CPU: any GPU is hidden from it
(``CUDA_VISIBLE_DEVICES=""``), so the suite means the same on a GPU host.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

# Import the heavy modules once in the parent so forked workers inherit them (~3 s each).
import megatron.core.models.gpt  # noqa: F401
import megatron.core.transformer.moe.moe_layer  # noqa: F401
import torch

from megatron_grove.runtime import destroy_parallel, initialize_parallel
from megatron_grove.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "pretrain_grove.py"
TINY = ROOT / "configs" / "tiny_cpu.yaml"
CPU_ONLY_ENV = {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


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
                    timeout_s: float = 300, pipeline_parallel: int = 1,
                    virtual_pipeline: int | None = None,
                    ranks_per_node: Optional[int] = None,
                    expert_tensor_parallel: Optional[int] = None,
                    context_parallel: int = 1) -> list[Any]:
    """``fn(rank, *args)`` on ``world_size`` forked CPU processes (gloo, Megatron's groups set
    up; nodes of ``ranks_per_node`` ranks, None: one node); the return values (picklable) come
    back indexed by rank. An exception on any rank fails the caller with that rank's
    traceback. Forked workers start in ~0.2 s."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        parallel = dict(tensor_parallel=tensor_parallel, expert_parallel=expert_parallel,
                        pipeline_parallel=pipeline_parallel, virtual_pipeline=virtual_pipeline,
                        expert_tensor_parallel=expert_tensor_parallel,
                        context_parallel=context_parallel, seed=seed,
                        ranks_per_node=ranks_per_node)
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


def worker_pid(tag_name: str, tag: str, rank: int) -> int:
    """The pid of the ``launch/pretrain_grove.py`` worker of global rank ``rank`` among the
    processes whose environment has ``tag_name=tag``."""
    for line in processes_with_env(tag_name, tag):
        pid = int(line.split()[0])
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and "pretrain_grove.py" in line:
            return pid
    raise AssertionError(f"no worker of rank {rank}")


def wait_for_steps(log: Path, steps: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``log/metrics.jsonl`` holds ``steps`` records of the running ``proc``."""
    deadline = time.monotonic() + timeout
    while len(read_metrics(log / "metrics.jsonl")) < steps:
        assert proc.poll() is None, f"the run ended early ({proc.returncode})"
        assert time.monotonic() < deadline, "the run did not reach its first steps"
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Small and fast: 8 steps of 8 sequences x 32 tokens of the tiny config.
FAST = ["model.seq_length=32", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "moe.ffn_hidden_size=64", "train.iters=8", "train.lr_warmup_iters=2",
        "train.global_batch_size=8", "train.micro_batch_size=2", "logging.progress_bar=false"]


def torchrun_command(*overrides: str, nproc: int = 2, config: Path = TINY,
                     plain: bool = False) -> list[str]:
    """A command line of ``launch/pretrain_grove.py`` on ``config`` + FAST under our launcher
    (``python -m megatron_grove.launch``: the job's own exit code) or, ``plain``, torchrun."""
    launcher = "torch.distributed.run" if plain else "megatron_grove.launch"
    return [sys.executable, "-m", launcher, "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(LAUNCH),
            "--config", str(config), *FAST, *overrides]


def torchrun(*overrides: str, nproc: int = 2, check: bool = True, timeout: float = 600,
             plain: bool = False, env: Optional[dict[str, str]] = None
             ) -> subprocess.CompletedProcess:
    """Run the tiny config (+ FAST + ``overrides``) under our launcher (``plain``: torchrun)
    on CPU (``env``: extra environment variables)."""
    proc = subprocess.run(torchrun_command(*overrides, nproc=nproc, plain=plain),
                          capture_output=True, text=True, timeout=timeout, env=child_env(env))
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def losses(log_dir: Path) -> dict[int, float]:
    """``{step: loss}`` of a run's ``metrics.jsonl``."""
    return {r["step"]: r["loss"] for r in read_metrics(log_dir / "metrics.jsonl")}


def in_worker(fn: Callable[[], Any]) -> Any:
    """Run ``fn()`` on one gloo rank with Megatron's groups; its result comes back by value."""
    def worker(rank: int) -> bytes:
        return pickle.dumps(fn())
    return pickle.loads(run_distributed(worker, world_size=1)[0])
