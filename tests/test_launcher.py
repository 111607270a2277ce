"""``python -m megatron_grove.launch``: torchrun's flags, the job's own exit code, no
traceback after a worker's one line. (The exit codes 2, 3 and 4 under it are asserted by
tests/test_faults.py, the SLURM script's by tests/test_multinode.py.)"""

import signal
import subprocess
import sys

import pytest

from processes import child_env, torchrun, torchrun_command, wait_for_steps, worker_pid
from megatron_grove.job_exit import WorkerExit
from megatron_grove.launch import job_exit_code

TAG = "MEGATRON_GROVE_TEST_RUN"


def test_a_code_other_than_1_wins_and_the_earliest_among_them() -> None:
    # rank 1 failed first for an ordinary reason; rank 0's collective failed after it
    assert job_exit_code([WorkerExit(0, 1, 10.0), WorkerExit(1, 2, 11.0)], {}) == (2, 1)
    assert job_exit_code([WorkerExit(0, 3, 10.0), WorkerExit(1, 4, 9.0)], {}) == (4, 1)
    assert job_exit_code([WorkerExit(0, 1, 10.0), WorkerExit(1, 1, 9.0)], {}) == (1, 1)


def test_a_killed_worker_is_128_plus_its_signal_and_a_report_beats_the_agents_view() -> None:
    # rank 1 was SIGKILLed (torch's exitcode -9, no report); rank 0 then saw a collective fail
    assert job_exit_code([WorkerExit(0, 1, 14.2)], {0: (1, 14.0), 1: (-9, 11.0)}) == (137, 1)
    assert job_exit_code([WorkerExit(0, 4, 12.0)], {0: (4, 12.0)}) == (4, 0)


def test_workers_the_agent_kills_after_a_failure_are_not_its_cause() -> None:
    # the hang watchdog's rank 0 exits 1; the agent then kills the stopped rank 1 (SIGKILL)
    assert job_exit_code([WorkerExit(0, 1, 40.5)], {0: (1, 40.0), 1: (-9, 71.0)}) == (1, 0)
    # rank 0's bad input; rank 1, still starting, dies of the agent's SIGTERM the same second
    assert job_exit_code([WorkerExit(0, 2, 40.5)], {0: (2, 40.0), 1: (-15, 40.0)}) == (2, 0)


def test_a_signal_to_the_launcher_takes_the_workers_code_else_128_plus_it() -> None:
    assert job_exit_code([WorkerExit(0, 4, 1.0), WorkerExit(1, 4, 1.1)], {},
                         launcher_signal=15) == (4, 0)
    assert job_exit_code([], {}, launcher_signal=15) == (143, None)
    assert job_exit_code([], {}) == (0, None)


def test_help_explains_the_exit_codes() -> None:
    proc = subprocess.run([sys.executable, "-m", "megatron_grove.launch", "--help"],
                          capture_output=True, text=True, env=child_env(), timeout=120)
    assert proc.returncode == 0
    assert "usage: python -m megatron_grove.launch" in proc.stdout
    assert "--nproc-per-node" in proc.stdout and "4 preempted" in proc.stdout


@pytest.mark.e2e
def test_a_killed_worker_ends_the_job_with_137_and_one_launch_line(tmp_path) -> None:
    tag = f"killed-{tmp_path.name}"
    log = tmp_path / "log"
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(
            torchrun_command("parallel.expert_model_parallel_size=2", "train.iters=200",
                             f"logging.dir={log}"),
            stdout=subprocess.DEVNULL, stderr=err, env=child_env({TAG: tag}))
    try:
        wait_for_steps(log, 2, proc)
        subprocess.run(["kill", "-KILL", str(worker_pid(TAG, tag, 1))], check=True)
        assert proc.wait(timeout=120) == 128 + signal.SIGKILL
    finally:
        proc.kill()
    stderr = (tmp_path / "stderr").read_text()
    assert "launch: exit 137 (killed by SIGKILL): from rank 1" in stderr
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr


@pytest.mark.e2e
def test_plain_torchrun_keeps_working_as_before(tmp_path) -> None:
    proc = torchrun("train.lr=-1", f"logging.dir={tmp_path / 'log'}", check=False, plain=True)
    assert proc.returncode == 1 and "exitcode  : 2" in proc.stderr  # torchrun's summary
    assert "pretrain_grove.py: config error: train.lr=-1.0: must be a finite number >= 0" \
        in proc.stderr
