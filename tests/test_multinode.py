"""Two "nodes" on this machine: two torchrun launchers (--nnodes 2, c10d rendezvous on
127.0.0.1), one process each, expert-parallel size 2 across them. Same losses as one launcher;
a killed rank stops its peer within runtime.dist_timeout_s with one clear line; a restart
(checkpoint.load=auto) resumes from the last checkpoint and continues the same run."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_grove.checkpointing import latest_iteration
from megatron_grove.training.metrics import read_metrics
from processes import FAST, LAUNCH, TINY, child_env, free_port, losses, processes_with_env, torchrun

pytestmark = pytest.mark.e2e

ITERS = 20
TIMEOUT_S = 20
COMMON = [f"train.iters={ITERS}", "parallel.expert_model_parallel_size=2",
          f"runtime.dist_timeout_s={TIMEOUT_S}"]


def launch_nodes(out_dir: Path, *overrides: str, env: dict | None = None) -> list[subprocess.Popen]:
    """Start two launchers of a fresh job (one process each); node i writes its stdout and
    stderr to ``out_dir/node{i}.out`` / ``.err`` (files: a full pipe would block a launcher);
    ``env`` adds to their environment. Node 0 hosts the rendezvous store, as the node named by
    ``--rdzv-endpoint`` does on a cluster: node 1 starts once the store listens."""
    port, job = free_port(), f"job{free_port()}"
    procs = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job, str(LAUNCH),
               "--config", str(TINY), *FAST, *COMMON, *overrides]
        with open(out_dir / f"node{node}.out", "w") as out, \
                open(out_dir / f"node{node}.err", "w") as err:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, env=child_env(env)))
        if node == 0:
            _wait_for_listener(port, procs[0])
    return procs


def _wait_for_listener(port: int, launcher: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert launcher.poll() is None and time.monotonic() < deadline, \
                "node 0's launcher never opened the rendezvous store"
            time.sleep(0.1)


def finish(procs, out_dir: Path, timeout=300) -> list[tuple[int, str, str]]:
    """Wait for both launchers; (exit code, stdout, stderr) per node."""
    for p in procs:
        p.wait(timeout=timeout)
    return [(p.returncode, (out_dir / f"node{i}.out").read_text(),
             (out_dir / f"node{i}.err").read_text()) for i, p in enumerate(procs)]


@pytest.fixture(scope="module")
def single_launcher(tmp_path_factory):
    """The reference: one torchrun, 2 processes, EP=2, plain optimizer."""
    log = tmp_path_factory.mktemp("single")
    torchrun(*COMMON, f"logging.dir={log}")
    return losses(log)


def test_two_nodes_match_one_launcher(single_launcher, tmp_path):
    # distributed optimizer on: the same numbers as the plain one
    results = finish(launch_nodes(tmp_path, f"logging.dir={tmp_path}",
                                  "parallel.use_distributed_optimizer=true"), tmp_path)
    assert [rc for rc, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    two_nodes = losses(tmp_path)
    assert two_nodes.keys() == single_launcher.keys()
    for step, loss in single_launcher.items():
        assert two_nodes[step] == pytest.approx(loss, rel=1e-5), step


def _worker_pid(launcher: subprocess.Popen) -> int:
    """The training process torchrun started (the launcher's only child)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_killed_rank_stops_the_job_and_restart_resumes(single_launcher, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    args = (f"logging.dir={log}", f"checkpoint.save={ckpt}", "checkpoint.save_interval=2",
            "checkpoint.load=auto", "parallel.use_distributed_optimizer=true",
            "checkpoint.optimizer_format=dp_reshardable")  # as in the 33B recipes
    tag = f"killed-rank-{tmp_path.name}"
    nodes = launch_nodes(tmp_path, *args, env={"MEGATRON_GROVE_TEST_RUN": tag})
    deadline = time.monotonic() + 240
    while not ((ckpt / "latest_checkpointed_iteration.txt").is_file() and latest_iteration(ckpt) >= 4):
        assert time.monotonic() < deadline and nodes[0].poll() is None, "no checkpoint written"
        time.sleep(0.1)
    os.kill(_worker_pid(nodes[1]), signal.SIGKILL)
    killed = time.monotonic()
    (rc0, _, err0), (rc1, _, _) = finish(nodes, tmp_path, timeout=TIMEOUT_S + 60)
    stopped_after = time.monotonic() - killed
    assert rc0 != 0 and rc1 != 0
    assert stopped_after < TIMEOUT_S + 30, stopped_after  # torchrun's own teardown included
    ours = [line for line in err0.splitlines() if line.startswith("pretrain_grove.py: rank 0")]
    assert len(ours) == 1, err0[-3000:]
    assert "a collective failed" in ours[0] and f"resume from the last checkpoint in {ckpt}" in ours[0]
    assert "[rank0]: Traceback" not in err0  # our rank: one line, not a wall of tracebacks
    deadline = time.monotonic() + 10  # no process of the job outlives it (helpers included)
    while processes_with_env("MEGATRON_GROVE_TEST_RUN", tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_env("MEGATRON_GROVE_TEST_RUN", tag) == []
    saved = latest_iteration(ckpt)
    assert 4 <= saved < ITERS

    # the same command again: resumes from the last checkpoint, ends the run
    (rc0, out, err0), (rc1, _, _) = finish(launch_nodes(tmp_path, *args), tmp_path)
    assert (rc0, rc1) == (0, 0), err0[-3000:]
    assert f"resumed from checkpoint step {saved} in {ckpt}" in out
    resumed = losses(log)
    assert sorted(resumed) == list(range(1, ITERS + 1))
    for step in range(saved + 1, ITERS + 1):
        assert resumed[step] == pytest.approx(single_launcher[step], rel=1e-5), step
    assert latest_iteration(ckpt) == ITERS


def _sbatch(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """The SLURM script, with stand-ins for ``srun`` (runs its command) and ``scontrol`` (names
    this host; records its arguments in tmp_path/scontrol.log), on a one-"node" allocation of
    2 CPU ranks; stdout and stderr in tmp_path/sbatch.out / .err."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\n'
                                      'echo 127.0.0.1\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    root = LAUNCH.parents[1]
    env = {**child_env(), "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NUM_NODES": "1",
           "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_ID": "42", "SLURM_SUBMIT_DIR": str(root),
           "GPUS_PER_NODE": "2", "RDZV_PORT": str(free_port()), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "sbatch.out", "w") as out, open(tmp_path / "sbatch.err", "w") as err:
        return subprocess.Popen(["bash", str(root / "launch" / "slurm" / "pretrain_grove.sbatch"),
                                 str(TINY), *FAST, "parallel.expert_model_parallel_size=2",
                                 *overrides], stdout=out, stderr=err, env=env, cwd=tmp_path)


def test_sbatch_script_runs_one_torchrun_per_node(tmp_path):
    proc = _sbatch(tmp_path, f"logging.dir={tmp_path / 'log'}")
    assert proc.wait(timeout=300) == 0, (tmp_path / "sbatch.err").read_text()[-3000:]
    out = (tmp_path / "sbatch.out").read_text()
    assert "rendezvous 127.0.0.1:" in out and "done: 8 steps" in out
    assert sorted(losses(tmp_path / "log")) == list(range(1, 9))


def test_sbatch_time_limit_signal_saves_and_requeues(tmp_path):
    """SIGUSR1 to the batch shell (SLURM's --signal=B:USR1@300 before the time limit): every
    rank finishes its step and saves, and the job requeues itself."""
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    proc = _sbatch(tmp_path, "train.iters=200", f"checkpoint.save={ckpt}", f"logging.dir={log}")
    deadline = time.monotonic() + 240
    while len(read_metrics(log / "metrics.jsonl")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, \
            (tmp_path / "sbatch.err").read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 4  # preempted and saved: the job's own code
    stopped = read_metrics(log / "metrics.jsonl")[-1]["step"]
    assert 3 <= stopped < 200 and latest_iteration(ckpt) == stopped
    assert f"SIGUSR1 received: stopped after step {stopped}; the latest checkpoint is step " \
           f"{stopped}" in (tmp_path / "sbatch.err").read_text()
    assert "requeueing" in (tmp_path / "sbatch.out").read_text()
    assert "requeue 42" in (tmp_path / "scontrol.log").read_text().splitlines()


def test_sbatch_never_requeues_bad_input(tmp_path):
    proc = _sbatch(tmp_path, "train.lr=-1", f"logging.dir={tmp_path / 'log'}")
    assert proc.wait(timeout=300) == 2, (tmp_path / "sbatch.err").read_text()[-3000:]
    assert "pretrain_grove.py: config error: train.lr=-1.0: must be a finite number >= 0" in \
        (tmp_path / "sbatch.err").read_text()
    assert "not requeueing" in (tmp_path / "sbatch.out").read_text()
    assert not any(line.startswith("requeue") for line in
                   (tmp_path / "scontrol.log").read_text().splitlines())


def test_only_collective_failures_get_the_one_line_exit():
    from megatron_grove.runtime import collective_failure

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
                        "[127.0.0.1]:45440: Connection reset by peer. This is typically caused by "
                        "a remote worker hanging")
    assert collective_failure(gloo) == "Read error [127.0.0.1]:45440: Connection reset by peer"
    assert collective_failure(RuntimeError("shape mismatch: [2, 3] vs [3]")) is None
    assert collective_failure(ValueError("Connection reset")) is None
