"""One run per checkpoint folder (checkpointing/run_lock.py): a live holder is refused by name,
a killed one's lock is taken over, a silent one on another host after lock_stale_s, a requeued
SLURM job takes its own lock back; two runs submitted together: one trains, one refuses."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from processes import child_env, losses, torchrun_command
from megatron_grove.checkpointing import run_lock
from megatron_grove.checkpointing.run_lock import LOCK_NAME, RunLockHeld, _pid_start, take_run_lock


def _foreign_lock(folder, host: str, pid: int, job_id=None, age_s: float = 0.0) -> None:
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"host": host, "pid": pid, "pid_start": _pid_start(pid),
                                "job_id": job_id, "started": "2026-01-01T00:00:00+00:00"}))
    os.utime(path, (time.time() - age_s, time.time() - age_s))


@pytest.fixture
def live_process():
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_live_holder_is_refused_by_name_and_nothing_changes(tmp_path, live_process) -> None:
    host = socket.gethostname()
    _foreign_lock(tmp_path, host, live_process, job_id="7")
    before = (tmp_path / LOCK_NAME).read_text()
    with pytest.raises(RunLockHeld) as caught:
        take_run_lock(tmp_path, "checkpoint.save", stale_s=300)
    assert str(caught.value).startswith(
        f"checkpoint.save={tmp_path}: in use by the run of pid {live_process} on {host}, SLURM "
        f"job 7, started 2026-01-01T00:00:00+00:00 (its lock {tmp_path / LOCK_NAME}, heartbeat ")
    assert "\n" not in str(caught.value)
    assert (tmp_path / LOCK_NAME).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]


def test_a_killed_holders_lock_is_taken_over_with_a_line(tmp_path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import importlib.util, time\n"  # the module alone: no Megatron
         f"spec = importlib.util.spec_from_file_location('run_lock', {str(run_lock.__file__)!r})\n"
         "import sys; module = sys.modules['run_lock'] = importlib.util.module_from_spec(spec)\n"
         "spec.loader.exec_module(module)\n"
         f"module.take_run_lock({str(tmp_path)!r}, 'checkpoint.save', 300)\n"
         "print('taken', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True, env=child_env())
    assert holder.stdout.readline() == "taken\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock, note = take_run_lock(tmp_path, "checkpoint.save", stale_s=300)
    assert note.startswith(f"checkpoint.save={tmp_path}: took over the lock of the run of pid "
                           f"{holder.pid} on {socket.gethostname()}")
    assert note.endswith(f": its process {holder.pid} is gone from {socket.gethostname()}")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_another_hosts_lock_is_stale_only_without_heartbeat(tmp_path) -> None:
    _foreign_lock(tmp_path, "node-17", 4242, age_s=10)
    with pytest.raises(RunLockHeld, match="in use by the run of pid 4242 on node-17"):
        take_run_lock(tmp_path, "logging.dir", stale_s=300)
    _foreign_lock(tmp_path, "node-17", 4242, age_s=400)
    lock, note = take_run_lock(tmp_path, "logging.dir", stale_s=300)
    assert note.endswith("no heartbeat for 400 s (checkpoint.lock_stale_s=300)")
    lock.release()


def test_a_requeued_slurm_job_takes_its_own_lock_back(tmp_path, monkeypatch) -> None:
    _foreign_lock(tmp_path, "node-3", 999, job_id="42")  # fresh, another host
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    lock, note = take_run_lock(tmp_path, "checkpoint.save", stale_s=300)
    assert note.endswith(": the same SLURM job 42, requeued")
    assert json.loads((tmp_path / LOCK_NAME).read_text())["job_id"] == "42"
    lock.release()


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path) -> None:
    lock, _ = take_run_lock(tmp_path, "checkpoint.save", stale_s=1)  # beats every 0.5 s
    os.utime(tmp_path / LOCK_NAME, (time.time() - 100, time.time() - 100))
    time.sleep(1.5)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 1.5
    lock.release()


@pytest.mark.e2e
def test_two_runs_submitted_together_one_trains_one_refuses(tmp_path) -> None:
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    runs = [subprocess.Popen(torchrun_command("parallel.expert_model_parallel_size=2",
                                              f"checkpoint.save={ckpt}", f"logging.dir={log}"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=child_env()) for _ in range(2)]
    results = [(run.wait(timeout=600), *run.communicate()) for run in runs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], [err[-2000:] for _, _, err in results]
    (refused,) = [err for code, _, err in results if code == 2]
    ours = [line for line in refused.splitlines() if line.startswith("pretrain_grove.py")]
    assert len(ours) == 1 and ours[0].startswith(
        f"pretrain_grove.py: config error: checkpoint.save={ckpt}: in use by the run of pid ")
    assert sorted(losses(log)) == list(range(1, 9))  # one run's steps, once each
    assert not (ckpt / LOCK_NAME).exists() and not (log / LOCK_NAME).exists()  # released
