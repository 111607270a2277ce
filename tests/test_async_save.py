"""Asynchronous checkpoint saves (``checkpoint.async_save``): Megatron's async dist-checkpoint
save under our atomic publication (manifest, rename, ``latest`` only once every rank's write
has finished), one write in flight, and faults injected during the write."""

import os
import time
from pathlib import Path

import pytest
import torch

from config_builders import small_model_and_optimizer
from processes import losses, processes_with_env, run_distributed, torchrun
from megatron_grove.checkpointing import (
    TrainState,
    latest_iteration,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_grove.checkpointing.async_save import SLOW_WRITE_ENV, AsyncCheckpointSaver
from megatron_grove.training.metrics import read_metrics


def _state(step):
    return TrainState(step=step, consumed_samples=8 * step, scheduler={}, config={})


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _async_saves(rank, root, slow_s):
    """Step 1 saved synchronously; step 2 asynchronously while the weights change right after
    the save call (as the next training steps do); a third save while step 2 is in flight."""
    os.environ[SLOW_WRITE_ENV] = str(slow_s)
    model, optimizer = small_model_and_optimizer()
    save_checkpoint(root, model, optimizer, _state(1))
    lines = []
    saver = AsyncCheckpointSaver(log=lines.append)
    at_save = _weights(model)
    saver.save(root, model, optimizer, _state(2), "fully_reshardable")
    with torch.no_grad():  # training goes on: the write must hold the step-2 state
        for p in model.parameters():
            p.add_(1.0)
    in_flight = (saver.pending_step, latest_iteration(root), (Path(root) / "iter_0000002").exists())
    after_change = _weights(model)
    saver.save(root, model, optimizer, _state(3), "fully_reshardable")  # waits for step 2 first
    published_2 = latest_iteration(root)
    saver.wait()
    # the checkpoints hold the weights at their save calls
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.0)
    load_checkpoint(root, model, optimizer, step=2)
    loaded_2 = _weights(model)
    load_checkpoint(root, model, optimizer, step=3)
    loaded_3 = _weights(model)
    return {"in_flight": in_flight, "published_2": published_2, "latest": latest_iteration(root),
            "lines": lines,
            "step2_equal": all(torch.equal(at_save[k], loaded_2[k]) for k in at_save),
            "step3_equal": all(torch.equal(after_change[k], loaded_3[k]) for k in at_save),
            "verified": [verify_checkpoint(Path(root) / f"iter_000000{s}") for s in (1, 2, 3)]}


def test_async_save_publishes_after_the_write_and_holds_the_state_at_the_call(tmp_path):
    root = tmp_path / "ckpt"
    results = run_distributed(_async_saves, world_size=2, expert_parallel=2,
                              args=(str(root), 1.0), timeout_s=200)
    for rank, r in enumerate(results):
        # while step 2 is written, step 1 stays the latest and step 2 is not published
        assert r["in_flight"] == (2, 1, False), r
        assert r["published_2"] == 2  # the second save waited for the first write
        assert r["latest"] == 3
        assert r["step2_equal"] and r["step3_equal"]
        assert r["verified"] == [None, None, None]
    assert results[0]["lines"] == [
        "checkpoint: the write of step 2 is still in flight; waiting for it before saving "
        "step 3 (at most one write at a time)"]
    assert not list(root.glob(".iter_*.tmp"))


def _die_during_async_write(rank, root):
    os.environ[SLOW_WRITE_ENV] = "30"
    model, optimizer = small_model_and_optimizer()
    save_checkpoint(root, model, optimizer, _state(1))
    saver = AsyncCheckpointSaver()
    saver.save(root, model, optimizer, _state(2), "fully_reshardable")
    if rank == 1:
        time.sleep(0.5)
        os.kill(os.getpid(), 9)  # SIGKILL while every rank's write is in flight
    saver.wait()


def test_sigkill_during_async_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    tag = f"async-kill-{os.getpid()}"
    monkeypatch.setenv("MEGATRON_GROVE_TEST_RUN", tag)
    with pytest.raises(Exception):
        run_distributed(_die_during_async_write, world_size=2, expert_parallel=2,
                        args=(str(root),), timeout_s=60)
    deadline = time.monotonic() + 10  # the writers die with their ranks (PR_SET_PDEATHSIG)
    while processes_with_env("MEGATRON_GROVE_TEST_RUN", tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_with_env("MEGATRON_GROVE_TEST_RUN", tag) == []
    assert latest_iteration(root) == 1 and not (root / "iter_0000002").exists()
    assert verify_checkpoint(root / "iter_0000001") is None


# --------------------------------------------------------------------------------------
# end to end (torchrun)
# --------------------------------------------------------------------------------------

E2E = ("train.iters=8", "parallel.expert_model_parallel_size=2", "checkpoint.save_interval=2")


def _ours(stderr: str) -> list[str]:
    return [line.split(": ", 1)[1] for line in stderr.splitlines()
            if line.startswith("pretrain_grove.py: ")]


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory) -> Path:
    """The synchronous run (saves every 2 steps): its folder with ckpt/ and log/."""
    root = tmp_path_factory.mktemp("sync")
    torchrun(*E2E, f"checkpoint.save={root / 'ckpt'}", f"logging.dir={root / 'log'}")
    return root


@pytest.mark.e2e
def test_async_run_has_the_synchronous_losses_and_checkpoints(sync_run, tmp_path):
    """Saves every 2 steps, each write slowed by 1.5 s so that it overlaps the next steps: the
    losses equal the synchronous run's bit for bit, every checkpoint verifies and holds the
    same tensors as the synchronous one, and a save finding the previous write in flight
    waits for it and says so."""
    sync_root, async_root = sync_run, tmp_path / "async"
    proc = torchrun(*E2E, f"checkpoint.save={async_root / 'ckpt'}",
                    f"logging.dir={async_root / 'log'}", "checkpoint.async_save=true",
                    env={SLOW_WRITE_ENV: "1.5"})
    assert losses(async_root / "log") == losses(sync_root / "log")
    assert sorted(p.name for p in (async_root / "ckpt").glob("iter_*")) == [
        f"iter_000000{s}" for s in (2, 4, 6, 8)]
    assert latest_iteration(async_root / "ckpt") == 8
    assert not list((async_root / "ckpt").glob(".iter_*.tmp"))
    waits = [line for line in proc.stderr.splitlines() if "still in flight" in line]
    assert waits, proc.stderr[-2000:]
    for step in (2, 8):
        a, s = (_tensors(root / "ckpt" / f"iter_000000{step}") for root in (async_root, sync_root))
        assert a.keys() == s.keys() and all(torch.equal(a[k], s[k]) for k in a), step


def _tensors(folder: Path) -> dict:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(folder)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.e2e
def test_sigterm_during_an_async_write_waits_for_it_then_saves_and_resumes(sync_run, tmp_path):
    """SIGTERM to torchrun while step 2's write is in flight (slowed to 6 s): the stop waits for
    that write, saves its own step, and the resumed run continues the uninterrupted losses."""
    import signal
    import subprocess

    from processes import child_env, torchrun_command

    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    run = (*E2E, "checkpoint.async_save=true", f"checkpoint.save={ckpt}", f"logging.dir={log}")
    with open(tmp_path / "stderr", "w") as err:
        proc = subprocess.Popen(torchrun_command(*run), stdout=subprocess.DEVNULL, stderr=err,
                                env=child_env({SLOW_WRITE_ENV: "6"}), text=True)
    deadline = time.monotonic() + 300
    while len(read_metrics(log / "metrics.jsonl")) < 3:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    assert latest_iteration(ckpt) is None  # step 2 is still being written
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stopped = read_metrics(log / "metrics.jsonl")[-1]["step"]
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode != 0 and latest_iteration(ckpt) == stopped
    assert (ckpt / "iter_0000002").is_dir()  # the pending write was finished and published
    ours = _ours(stderr)
    assert f"SIGTERM received: stopped after step {stopped}; the latest checkpoint is step " \
           f"{stopped} in {ckpt}; run the same command to resume" in ours, stderr[-2000:]
    torchrun(*run)
    resumed, expected = losses(log), losses(sync_run / "log")  # saving changes no loss
    assert sorted(resumed) == list(range(1, 9))
    for step in range(stopped + 1, 9):
        assert resumed[step] == expected[step], step
