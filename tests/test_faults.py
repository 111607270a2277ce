"""Fault injection under real torchrun (2 gloo processes, EP=2): what a user sees when a
checkpoint is damaged, training diverges, the job is preempted or re-submitted, the metrics file
was torn by a crash, the save folder cannot be written, a rank fails for an ordinary reason, or
the disk fills up; and the tools on a checkpoint trained with the vocabulary size unset.
docs/fault_tolerance.md lists every fault and the answer."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megatron_grove.checkpointing import checkpoint_dir, latest_iteration
from megatron_grove.data.datasets import heldout_text_path
from megatron_grove.training.metrics import read_metrics
from processes import (
    child_env,
    in_world,
    losses,
    processes_with_env,
    run_script,
    torchrun,
    torchrun_command,
    wait_for_steps,
)

pytestmark = pytest.mark.e2e

ITERS = 10
COMMON = (f"train.iters={ITERS}", "parallel.expert_model_parallel_size=2")
TAG = "MEGATRON_GROVE_TEST_RUN"


def _ours(stderr: str) -> list[str]:
    """Our one-line messages (not torchrun's summary)."""
    return [line for line in stderr.splitlines() if line.startswith("pretrain_grove.py: ")]


def _strict_lines(path: Path) -> list[dict]:
    def refuse(constant):
        raise AssertionError(f"{path}: non-standard JSON constant {constant}")
    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run's losses."""
    log = tmp_path_factory.mktemp("straight")
    torchrun(*COMMON, f"logging.dir={log}")
    return losses(log)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """The same run stopped after step 6: checkpoints at steps 3 and 6 (model.vocab_size is
    unset in configs/tiny_cpu.yaml), metrics of steps 1-6."""
    root = tmp_path_factory.mktemp("interrupted")
    torchrun(*COMMON, "train.exit_at_iter=6", "checkpoint.save_interval=3",
             f"checkpoint.save={root / 'ckpt'}", f"logging.dir={root / 'log'}")
    return root


def _copy(interrupted: Path, tmp_path: Path) -> tuple[Path, Path]:
    shutil.copytree(interrupted, tmp_path / "run")
    return tmp_path / "run" / "ckpt", tmp_path / "run" / "log"


def test_rerun_keeps_progress_and_drops_a_torn_metrics_line(interrupted, straight, tmp_path):
    ckpt, log = _copy(interrupted, tmp_path)
    with open(log / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 7.3')  # the crash tore the last line mid-write
    run = (*COMMON, "checkpoint.save_interval=3", f"checkpoint.save={ckpt}", f"logging.dir={log}")
    out = torchrun(*run).stdout  # no checkpoint.load: the run's own checkpoints win
    assert f"resumed from checkpoint step 6 in {ckpt}" in out
    records = _strict_lines(log / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, ITERS + 1))
    for step in range(7, ITERS + 1):
        assert records[step - 1]["loss"] == straight[step], step
    assert latest_iteration(ckpt) == ITERS

    # the very same command once more: nothing to train, nothing moved back or truncated
    out = torchrun(*run).stdout
    assert f"checkpoint is at step {ITERS} >= train.iters={ITERS}: nothing to train" in out
    assert latest_iteration(ckpt) == ITERS and _strict_lines(log / "metrics.jsonl") == records


def _damage(folder: Path) -> Path:
    """Overwrite 4 KB in the middle of the folder's largest shard with random bytes."""
    shard = max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)
    with open(shard, "r+b") as f:
        f.seek(shard.stat().st_size // 2)
        f.write(os.urandom(4096))
    return shard


def test_corrupted_shard_is_refused_and_a_resume_falls_back(interrupted, tmp_path):
    ckpt, log = _copy(interrupted, tmp_path)
    shard = _damage(checkpoint_dir(ckpt, 6))

    named = torchrun(*COMMON, f"checkpoint.load={checkpoint_dir(ckpt, 6)}",
                     f"checkpoint.save={tmp_path / 'other'}", f"logging.dir={tmp_path / 'l2'}",
                     check=False)
    assert named.returncode == 2 and "launch: exit 2 (bad input): from rank" in named.stderr
    assert _ours(named.stderr) == [f"pretrain_grove.py: checkpoint error: {shard}: checksum "
                                   "mismatch: its bytes changed after the save; the checkpoint "
                                   "is damaged or incomplete"]
    assert "[rank0]: Traceback" not in named.stderr and "[rank1]: Traceback" not in named.stderr

    resumed = torchrun(*COMMON, "train.exit_at_iter=7", f"checkpoint.save={ckpt}",
                       f"logging.dir={log}")
    assert f"resuming: skipped {shard}: checksum mismatch" in resumed.stderr
    assert f"resumed from checkpoint step 3 in {ckpt}" in resumed.stdout
    assert [r["step"] for r in read_metrics(log / "metrics.jsonl")] == list(range(1, 8))
    assert latest_iteration(ckpt) == 7


def _nonfinite_tensors(folder: str) -> list[str]:
    import torch
    from megatron.core.dist_checkpointing import load_plain_tensors

    return [key for key, value in load_plain_tensors(folder).items()
            if torch.is_tensor(value) and value.is_floating_point()
            and not bool(torch.isfinite(value).all())]


def test_divergence_stops_with_a_finite_latest_checkpoint_and_strict_json(tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    proc = torchrun(*COMMON, "train.lr=1e6", "train.max_skipped_steps=2",
                    "checkpoint.save_interval=1", f"checkpoint.save={ckpt}", f"logging.dir={log}",
                    check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    (line,) = [m for m in _ours(proc.stderr) if "non-finite training" in m]
    latest = latest_iteration(ckpt)
    assert "for 3 consecutive steps (train.max_skipped_steps=2); stopped without saving (the " \
           f"latest checkpoint is step {latest} in {ckpt})" in line
    records = _strict_lines(log / "metrics.jsonl")  # every line strict JSON
    skipped = [r["step"] for r in records if r["skipped"]]
    assert len(skipped) == 3 and skipped == list(range(skipped[0], skipped[0] + 3))
    assert latest == skipped[0] - 1  # nothing saved from a skipped step on
    assert in_world(_nonfinite_tensors, str(checkpoint_dir(ckpt, latest))) == []


def _launch(tmp_path: Path, tag: str, *overrides: str) -> subprocess.Popen:
    """A torchrun of the tiny run (stderr to tmp_path/stderr), every process tagged ``tag``."""
    with open(tmp_path / "stderr", "w") as err:
        return subprocess.Popen(torchrun_command(*COMMON, *overrides), stdout=subprocess.DEVNULL,
                                stderr=err, env=child_env({TAG: tag}), text=True)


def _no_process_left(tag: str, grace_s: float = 10) -> list[str]:
    deadline = time.monotonic() + grace_s
    while (left := processes_with_env(TAG, tag)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def test_sigterm_saves_the_current_step_and_the_resume_continues_the_run(straight, tmp_path):
    ckpt, log, tag = tmp_path / "ckpt", tmp_path / "log", f"sigterm-{tmp_path.name}"
    run = ("checkpoint.save_interval=100", f"checkpoint.save={ckpt}", f"logging.dir={log}")
    proc = _launch(tmp_path, tag, *run)
    wait_for_steps(log, 3, proc)
    proc.send_signal(signal.SIGTERM)  # to the launcher, as SLURM or Kubernetes would
    assert proc.wait(timeout=120) == 4  # the workers' code, not torchrun's 1
    assert _no_process_left(tag) == []
    stopped = read_metrics(log / "metrics.jsonl")[-1]["step"]
    assert 3 <= stopped < ITERS and latest_iteration(ckpt) == stopped
    assert _ours((tmp_path / "stderr").read_text()) == [
        f"pretrain_grove.py: SIGTERM received: stopped after step {stopped}; the latest "
        f"checkpoint is step {stopped} in {ckpt}; run the same command to resume"]

    out = torchrun(*COMMON, *run).stdout
    assert f"resumed from checkpoint step {stopped} in {ckpt}" in out
    resumed = losses(log)
    assert sorted(resumed) == list(range(1, ITERS + 1))
    for step in range(stopped + 1, ITERS + 1):
        assert resumed[step] == straight[step], step


def test_killed_launcher_makes_its_workers_save_and_exit(tmp_path):
    """torchrun killed with SIGKILL (an OOM killer, a node agent): its workers get SIGTERM from
    the kernel, save their current step and exit; nothing of the run is left."""
    ckpt, log, tag = tmp_path / "ckpt", tmp_path / "log", f"launcher-{tmp_path.name}"
    proc = _launch(tmp_path, tag, "train.iters=200", f"checkpoint.save={ckpt}",
                   f"logging.dir={log}")
    wait_for_steps(log, 3, proc)
    proc.kill()
    proc.wait()
    assert _no_process_left(tag, grace_s=120) == []
    stopped = read_metrics(log / "metrics.jsonl")[-1]["step"]
    assert latest_iteration(ckpt) == stopped
    assert f"pretrain_grove.py: SIGTERM received: stopped after step {stopped}; the latest " \
           f"checkpoint is step {stopped} in {ckpt}" in (tmp_path / "stderr").read_text()


def test_unwritable_save_folder_fails_before_step_1(tmp_path):
    (tmp_path / "file").write_text("a file, not a folder")
    proc = torchrun(*COMMON, f"checkpoint.save={tmp_path / 'file' / 'ckpt'}",
                    f"logging.dir={tmp_path / 'log'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _ours(proc.stderr) == [f"pretrain_grove.py: config error: checkpoint.save="
                                  f"{tmp_path / 'file' / 'ckpt'}: cannot write there (Not a "
                                  "directory); choose a writable folder"]
    assert not (tmp_path / "log" / "metrics.jsonl").exists()  # no step ran


def test_the_failing_rank_prints_first_and_its_peer_names_it(tmp_path):
    log, tag = tmp_path / "log", f"order-{tmp_path.name}"
    proc = _launch(tmp_path, tag, f"logging.dir={log}", "train.iters=200")
    wait_for_steps(log, 2, proc)
    (log / "metrics.jsonl").rename(log / "moved.jsonl")
    (log / "metrics.jsonl").mkdir()  # rank 0, the only writer, fails at its next record
    proc.wait(timeout=180)
    assert _no_process_left(tag) == []
    lines = _ours((tmp_path / "stderr").read_text())
    assert lines[0] == (f"pretrain_grove.py: rank 0: {log / 'metrics.jsonl'}: Is a directory; "
                        "fix that, then run the same command to resume")
    assert len(lines) == 2, lines
    assert lines[1].startswith("pretrain_grove.py: rank 1: a collective failed (")
    assert lines[1].endswith("): rank 0 stopped the job (its error is above); stopping")


def test_full_disk_says_so_and_where(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(full)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"needs a small tmpfs to fill, and mount was refused: {mount.stderr.strip()}")
    try:
        proc = torchrun(*COMMON, "checkpoint.save_interval=4", f"checkpoint.save={full / 'ckpt'}",
                        f"logging.dir={tmp_path / 'log'}", check=False)
    finally:
        subprocess.run(["umount", str(full)], check=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _ours(proc.stderr) == [
        f"pretrain_grove.py: checkpoint error: checkpoint.save: saving step 4 failed: no space "
        f"left on device in {full / 'ckpt'} (0 bytes free) (no checkpoint in {full / 'ckpt'} "
        "yet); fix that, then run the same command to resume"]


def test_tools_take_the_vocabulary_from_the_checkpoints_tokenizer(interrupted, tmp_path):
    ckpt, text = interrupted / "ckpt", tmp_path / "scene.txt"
    text.write_text(Path(heldout_text_path()).read_text()[:8000])  # a scene of Hamlet
    proc = run_script("tools/evaluate.py", "--checkpoint", str(ckpt), "--text", str(text),
                      "--seq-length", "32", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["format"] == "megatron" and 1 < result["ppl"] < 4096
    proc = run_script("tools/convert_checkpoint.py", "--source-format", "megatron",
                      "--target-format", "hf", "--input", str(ckpt), "--output",
                      str(tmp_path / "hf"), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["vocab_size"] == 4096
