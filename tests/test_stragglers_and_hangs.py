"""A rank slowed by SIGSTOP/SIGCONT bursts is named as a straggler (rank, host, its time; in
metrics.jsonl); a rank stopped for good is named by the hang watchdog, the live ranks' stacks
are written, the job exits 1 and the last checkpoint stays whole (under the launcher)."""

import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from processes import child_env, processes_with_env, torchrun_command, wait_for_steps, worker_pid
from megatron_grove.checkpointing import checkpoint_dir, latest_iteration
from megatron_grove.checkpointing.manifest import verify_manifest
from megatron_grove.training.metrics import read_metrics

pytestmark = pytest.mark.e2e
TAG = "MEGATRON_GROVE_TEST_RUN"


def _launch(tmp_path, tag, *overrides):
    err = open(tmp_path / "stderr", "w")
    return subprocess.Popen(torchrun_command("parallel.expert_model_parallel_size=2", *overrides),
                            stdout=subprocess.DEVNULL, stderr=err, env=child_env({TAG: tag}))


def _bursts(pid: int, done: threading.Event) -> None:
    """Stop ``pid`` 150 ms of every 250 ms until ``done``."""
    while not done.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.15)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.1)
        except ProcessLookupError:
            return


def _end(proc, tag) -> None:
    proc.kill()
    proc.wait()
    for line in processes_with_env(TAG, tag):
        pid = int(line.split()[0])
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _stragglers_recorded(log) -> list[dict]:
    return [r for r in read_metrics(log / "metrics.jsonl") if "stragglers" in r]


def test_a_rank_slowed_by_stop_bursts_is_named_a_straggler(tmp_path) -> None:
    # The run is longer than the test needs (a fast machine does the tiny steps in tens of ms):
    # the bursts start at step 4 and the run is ended once two exchanges in a row named rank 1.
    log, tag = tmp_path / "log", f"straggler-{tmp_path.name}"
    proc = _launch(tmp_path, tag, "train.iters=5000", f"logging.dir={log}",
                   "logging.straggler_interval=4", "logging.straggler_intervals=2")
    done = threading.Event()
    try:
        wait_for_steps(log, 4, proc)
        threading.Thread(target=_bursts, args=(worker_pid(TAG, tag, 1), done), daemon=True).start()
        deadline = time.monotonic() + 180
        while not _stragglers_recorded(log):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.2)
    finally:
        done.set()
        _end(proc, tag)
    host = socket.gethostname()
    lines = [line for line in (tmp_path / "stderr").read_text().splitlines()
             if line.startswith("straggler:")]
    assert lines and all(line.startswith(f"straggler: rank 1 ({host}) takes ") for line in lines)
    records = _stragglers_recorded(log)
    assert records and all([s["rank"] for s in r["stragglers"]] == [1] for r in records)
    found = records[-1]["stragglers"][0]
    assert found["host"] == host and found["step_time_s"] > 1.5 * found["median_s"]
    assert found["intervals"] >= 2 and found["first_step"] == records[-1]["step"] - 3
    assert found["step_time_s"] == records[-1]["rank_step_time_s"][1]
    exchanges = [r["step"] for r in read_metrics(log / "metrics.jsonl") if "rank_step_time_s" in r]
    assert exchanges == list(range(4, 4 * len(exchanges) + 1, 4))


def test_a_rank_stopped_for_good_is_named_by_the_watchdog_and_nothing_is_lost(tmp_path) -> None:
    log, ckpt, tag = tmp_path / "log", tmp_path / "ckpt", f"hang-{tmp_path.name}"
    proc = _launch(tmp_path, tag, "train.iters=200", f"logging.dir={log}",
                   f"checkpoint.save={ckpt}", "checkpoint.save_interval=2",
                   "runtime.hang_timeout_s=20")
    try:
        wait_for_steps(log, 4, proc)
        stopped = worker_pid(TAG, tag, 1)
        os.kill(stopped, signal.SIGSTOP)
        deadline = time.monotonic() + 120
        while "hang:" not in (tmp_path / "stderr").read_text():
            assert time.monotonic() < deadline and proc.poll() is None, \
                (tmp_path / "stderr").read_text()[-3000:]
            time.sleep(0.2)
        code = proc.wait(timeout=60)
    finally:
        _end(proc, tag)
    assert code == 1
    stderr = (tmp_path / "stderr").read_text()
    step = read_metrics(log / "metrics.jsonl")[-1]["step"]
    latest = latest_iteration(ckpt)
    (line,) = [x for x in stderr.splitlines() if x.startswith("pretrain_grove.py: hang:")]
    assert line.startswith(
        f"pretrain_grove.py: hang: no step finished within runtime.hang_timeout_s=20 s after "
        f"step {step}; rank 1 did not reach the collective (rank 0 waits in ")
    assert line.endswith(f"; stacks in {log}/hang-rank*.txt; the latest checkpoint is step "
                         f"{latest} in {ckpt}; run the same command to resume")
    assert "Traceback" not in stderr and "launch: exit 1" in stderr
    stacks = (log / "hang-rank0.txt").read_text()
    assert "most recent call first" in stacks and "train" in stacks
    assert not (log / "hang-rank1.txt").exists()  # a stopped process writes nothing
    assert latest >= 2 and verify_manifest(checkpoint_dir(ckpt, latest)) == []
