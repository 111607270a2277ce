"""Checkpoints: atomic saves (a rank killed in the middle of a save leaves the previous
checkpoint as the latest loadable one, and the next save cleans up), the manifest of checksums
checked on load (damaged, truncated, incomplete and legacy checkpoints), another model size
named on load, no helper process left behind, and rolling back."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from megatron_grove.checkpointing import (
    CheckpointError,
    TrainState,
    checkpoint_dir,
    checkpoint_steps,
    latest_iteration,
    load_checkpoint,
    remove_checkpoints_after,
    save_checkpoint,
    verify_checkpoint,
)
from megatron_grove.checkpointing import checkpoint as checkpoint_module
from megatron_grove.checkpointing import manifest as manifest_module
from megatron_grove.checkpointing.manifest import MANIFEST_NAME
from megatron_grove.config import load_config
from config_builders import small_model_and_optimizer
from processes import child_pids, processes_with_env, run_distributed



def _state(step):
    return TrainState(step=step, consumed_samples=8 * step, scheduler={}, config={})


def _weights(model):
    return {k: v.detach().clone() for k, v in model.module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def _save_then_die_during_second_save(rank, root):
    model, optimizer = small_model_and_optimizer()
    save_checkpoint(root, model, optimizer, _state(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    if rank == 1:  # dies after writing its shards, before the checkpoint is published
        torch.save = lambda *a, **k: os._exit(9)
    save_checkpoint(root, model, optimizer, _state(2))


def _load_then_save(rank, root):
    model, optimizer = small_model_and_optimizer()
    before = _weights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.0)
    state = load_checkpoint(root, model, optimizer)
    after = _weights(model)
    save_checkpoint(root, model, optimizer, _state(2))
    return state.step, all(torch.equal(before[k], after[k]) for k in before)


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ckpt"
    tag = f"kill-during-save-{os.getpid()}"
    monkeypatch.setenv("MEGATRON_GROVE_TEST_RUN", tag)  # inherited by anything a rank starts
    with pytest.raises(Exception):
        run_distributed(_save_then_die_during_second_save, world_size=2, expert_parallel=2,
                        args=(str(root),), timeout_s=120)
    assert processes_with_env("MEGATRON_GROVE_TEST_RUN", tag) == []  # no helper outlived them
    assert latest_iteration(root) == 1
    assert (root / ".iter_0000002.tmp").is_dir() and not (root / "iter_0000002").exists()

    # a fresh job resumes from step 1 with exactly the saved weights (the same seed builds the
    # same initial weights, so "equal to a fresh build" means "the step-1 weights"), then saves
    results = run_distributed(_load_then_save, world_size=2, expert_parallel=2, args=(str(root),))
    assert results == [(1, True), (1, True)]
    assert latest_iteration(root) == 2 and not list(root.glob(".iter_*.tmp"))


def test_load_without_checkpoint_says_what_to_do(tmp_path):
    with pytest.raises(CheckpointError, match="empty; a checkpoint folder is checkpoint.save"):
        load_checkpoint(tmp_path, model=None, optimizer=None)


def _save_and_list_helpers(rank, root, legacy):
    """Save step 1 (``legacy``: as before checksums existed: no manifest, no integrity mark);
    return this rank's child processes right after the save."""
    model, optimizer = small_model_and_optimizer()
    if legacy:
        checkpoint_module.write_manifest = lambda folder: None
        checkpoint_module._INTEGRITY = None
    save_checkpoint(root, model, optimizer, _state(1))
    return child_pids()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Step-1 checkpoints of the SMALL_RUN model at EP=2: with a manifest, and a legacy one."""
    root = tmp_path_factory.mktemp("saved")
    for legacy in (False, True):
        helpers = run_distributed(_save_and_list_helpers, world_size=2, expert_parallel=2,
                                  args=(str(root / str(legacy)), legacy))
        assert helpers == [[], []]  # Megatron's writer started no process on any rank
    return root


def _copy(saved, tmp_path, legacy=False) -> Path:
    folder = shutil.copytree(checkpoint_dir(saved / str(legacy), 1), tmp_path / "iter_0000001")
    return Path(folder)


def test_manifest_lists_every_file_and_verifies(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    files = json.loads((folder / MANIFEST_NAME).read_text())["files"]
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*")
               if p.is_file() and p.name != MANIFEST_NAME}
    assert set(files) == on_disk and {"rng/rank_00000.pt", "rng/rank_00001.pt"} <= on_disk
    assert all(entry["size"] == (folder / name).stat().st_size for name, entry in files.items())
    assert verify_checkpoint(folder) is None


def _largest_shard(folder: Path) -> Path:
    return max(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage, needle", [
    ("zeros", "checksum mismatch"), ("random", "checksum mismatch"),
    ("truncate", "truncated"), ("delete", "missing"), ("manifest", "manifest.json: missing"),
])
def test_damaged_checkpoint_is_one_line_naming_the_file(saved, tmp_path, damage, needle):
    folder = _copy(saved, tmp_path)
    shard = _largest_shard(folder)
    if damage in ("zeros", "random"):  # 4 KB of the shard, as a failing disk or copy would
        data = shard.read_bytes()
        start = next(i for i in range(len(data) // 2, len(data), 4096)
                     if any(data[i:i + 4096]))  # weights, not Adam's zero moments
        with open(shard, "r+b") as f:
            f.seek(start)
            f.write(bytes(4096) if damage == "zeros" else os.urandom(4096))
    elif damage == "truncate":
        os.truncate(shard, shard.stat().st_size - 1)
    elif damage == "delete":
        shard.unlink()
    else:
        (folder / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError) as err:
        verify_checkpoint(folder)
    message = str(err.value)
    assert "\n" not in message and needle in message
    if damage != "manifest":
        assert str(shard) in message


def test_large_files_are_hashed_in_pieces(saved, tmp_path, monkeypatch):
    folder = _copy(saved, tmp_path)
    monkeypatch.setattr(manifest_module, "PIECE_BYTES", 4096)
    manifest = manifest_module.write_manifest(folder)
    shard = _largest_shard(folder)
    crcs = manifest["files"][shard.name]["crc32"]
    assert len(crcs) == -(-shard.stat().st_size // 4096) > 1
    assert manifest_module.verify_manifest(folder) == []
    with open(shard, "r+b") as f:  # one flipped byte in one piece
        f.seek(5 * 4096 + 7)
        byte = f.read(1)
        f.seek(5 * 4096 + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert [str(p) for p in manifest_module.verify_manifest(folder)] == [
        f"{shard.name}: checksum mismatch: its bytes changed after the save"]


def test_files_hashed_by_their_writer_are_not_read_again(saved, tmp_path, monkeypatch):
    folder = _copy(saved, tmp_path)
    reference = manifest_module.write_manifest(folder)
    shard, other = sorted(folder.glob("*.distcp"), key=lambda p: p.stat().st_size)[-2:]
    manifest_module.record_written_files(folder, [shard, other], rank=0)
    with open(folder / manifest_module.HASHED_DIR / "rank_00000.json", "r+") as f:
        records = json.load(f)  # a record whose file changed size since is not trusted
        records[other.name]["size"] += 1
        f.seek(0), f.truncate(), json.dump(records, f)
    read = []
    crc32 = manifest_module._crc32
    monkeypatch.setattr(manifest_module, "_crc32",
                        lambda path, *a: read.append(Path(path).name) or crc32(path, *a))
    assert manifest_module.write_manifest(folder) == reference
    assert shard.name not in read and other.name in read
    assert not (folder / manifest_module.HASHED_DIR).exists()
    assert manifest_module.verify_manifest(folder) == []


def test_checkpoint_saved_before_manifests_loads_with_a_warning(saved, tmp_path):
    folder = _copy(saved, tmp_path, legacy=True)
    assert not (folder / MANIFEST_NAME).exists()
    warning = verify_checkpoint(folder)
    assert "no manifest.json" in warning and "loading it unverified" in warning


def _load_into_wider_model(rank, root):
    model, optimizer = small_model_and_optimizer("model.hidden_size=64")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(root, model, optimizer)
    return str(err.value)


def test_checkpoint_of_another_model_size_names_the_tensor_and_shapes(saved):
    messages = run_distributed(_load_into_wider_model, world_size=2, expert_parallel=2,
                               args=(str(saved / "False"),))
    assert messages[0] == messages[1]  # every rank refuses with the same line
    assert "embedding.word_embeddings.weight has shape (4096, 32) in the checkpoint and " \
           "(4096, 64) in this run's model" in messages[0]


def test_remove_checkpoints_after_keeps_older_ones_and_the_pointer_right(saved, tmp_path):
    root = tmp_path / "root"
    for step in (2, 4, 6):
        shutil.copytree(checkpoint_dir(saved / "False", 1), checkpoint_dir(root, step))
    (root / "latest_checkpointed_iteration.txt").write_text("6")
    assert remove_checkpoints_after(root, 4) == [6]
    assert checkpoint_steps(root) == [2, 4] and latest_iteration(root) == 4
    assert remove_checkpoints_after(root, 0) == [2, 4]
    assert checkpoint_steps(root) == [] and latest_iteration(root) is None


def _run_root(saved, root: Path, steps) -> Path:
    for step in steps:
        shutil.copytree(checkpoint_dir(saved / "False", 1), checkpoint_dir(root, step))
    (root / "latest_checkpointed_iteration.txt").write_text(str(max(steps)))
    return root


def test_a_run_resumes_its_newest_checkpoint_that_verifies(saved, tmp_path):
    from megatron_grove.training.resume import choose_start

    root = _run_root(saved, tmp_path / "ckpt", [2, 4])
    other = f"checkpoint.load={tmp_path / 'elsewhere'}"  # a new run's start: not used
    start = choose_start(load_config(None, [f"checkpoint.save={root}", other]))
    assert start.folder == checkpoint_dir(root, 4)
    assert start.notes == [f"{other} is not used: checkpoint.save={root} holds this run's step "
                           "4, which it resumes (to start from checkpoint.load instead, set "
                           "checkpoint.overwrite=true)"]
    _largest_shard(checkpoint_dir(root, 4)).unlink()
    start = choose_start(load_config(None, [f"checkpoint.save={root}", "checkpoint.load=auto"]))
    assert start.folder == checkpoint_dir(root, 2)
    assert start.notes[0].startswith(f"resuming: skipped {checkpoint_dir(root, 4)}/")
    assert start.notes[0].endswith(": missing; the checkpoint is damaged or incomplete")
    _largest_shard(checkpoint_dir(root, 2)).unlink()
    with pytest.raises(CheckpointError, match="holds checkpoints .steps 2, 4. but none verifies"):
        choose_start(load_config(None, [f"checkpoint.save={root}"]))


def test_overwrite_rolls_back_to_the_named_checkpoint(saved, tmp_path):
    from megatron_grove.training.resume import choose_start

    root = _run_root(saved, tmp_path / "ckpt", [1, 3, 5])  # copies of step 1's checkpoint
    start = choose_start(load_config(None, [f"checkpoint.save={root}", "checkpoint.overwrite=true",
                                            f"checkpoint.load={checkpoint_dir(root, 1)}"]))
    assert start.folder == checkpoint_dir(root, 1) and checkpoint_steps(root) == [1]
    assert latest_iteration(root) == 1
    assert start.notes == [f"checkpoint.overwrite=true: deleted the checkpoints of steps 3, 5 "
                           f"from {root}"]


def _rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def _save_repeatedly(rank, root):
    model, optimizer = small_model_and_optimizer()
    rss = []
    for step in range(1, 11):
        save_checkpoint(root, model, optimizer, _state(step))
        rss.append(_rss_mib())
    return rss


def test_repeated_saves_do_not_grow_the_process(tmp_path):
    """Ten saves: the resident set after the third stays within 4 MiB (the manifest's hashing
    once kept one 8 MiB buffer per save in the allocator's per-thread arenas)."""
    for rss in run_distributed(_save_repeatedly, world_size=2, expert_parallel=2,
                               args=(str(tmp_path / "ckpt"),)):
        assert rss[-1] - rss[2] < 4, rss
