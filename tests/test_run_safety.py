"""The pieces that keep long runs safe, one by one: strict-JSON metrics that a resume cuts
from the end (torn lines included), the non-finite guard's agreement across ranks, stop
signals, pre-flight checks, a full disk named as such, and the failing rank's note to its
peers. End-to-end behaviour under torchrun: tests/test_faults.py."""

import errno
import json
import math
import os
import signal
import time

import pytest
import torch

from megatron_grove.runtime import (
    announce_failure,
    disk_full,
    first_failure,
    signal_when_parent_dies,
)
from megatron_grove.training.metrics import (
    MetricsWriter,
    keep_records_through,
    read_metrics,
    strict_json,
)
from megatron_grove.training.nonfinite import (
    NonFiniteError,
    SkipCounter,
    StepHealth,
    first_nonfinite_weight,
    step_health,
)
from megatron_grove.training.preemption import StopSignals
from megatron_grove.training.preflight import dataset_problem, writable_dir_problem
from processes import run_distributed


def _strict(line: str):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(line, parse_constant=refuse)


# --------------------------------------------------------------------------------------
# metrics.jsonl
# --------------------------------------------------------------------------------------


def test_records_are_strict_json_with_null_for_non_finite():
    line = strict_json({"step": 3, "loss": math.nan, "grad_norm": math.inf,
                        "layers": [[1.0, -math.inf]], "lr": 1e-3})
    assert _strict(line) == {"step": 3, "loss": None, "grad_norm": None,
                             "layers": [[1.0, None]], "lr": 1e-3}


def _write(path, steps, tail=""):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)
                    + tail)


@pytest.mark.parametrize("keep, expected", [(4, [1, 2, 3, 4]), (9, [1, 2, 3, 4, 5, 6]),
                                            (0, [])])
def test_resume_cuts_later_records_and_a_torn_line(tmp_path, keep, expected):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 7), tail='{"step": 7, "loss": 0.1')  # a crash mid-write
    keep_records_through(path, keep)
    assert [r["step"] for r in read_metrics(path)] == expected
    assert path.read_text().endswith("\n") or not expected


def test_resume_cut_reads_only_the_tail(tmp_path, monkeypatch):
    """Cutting 2 records off a 20 MB file reads a few blocks from its end, not the file."""
    path = tmp_path / "metrics.jsonl"
    padding = "x" * 20_000
    path.write_text("".join(json.dumps({"step": s, "pad": padding}) + "\n"
                            for s in range(1, 1001)))
    read = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            self.f.close()

    monkeypatch.setattr("builtins.open", lambda *a, **k: Counting(real_open(*a, **k)))
    keep_records_through(path, 998)
    monkeypatch.undo()
    assert [r["step"] for r in read_metrics(path)][-1] == 998
    assert sum(read) < 1_000_000, sum(read)  # of 20 MB


def test_writer_sets_an_earlier_runs_file_aside_and_appends_on_resume(tmp_path):
    _write(tmp_path / "metrics.jsonl", [1, 2, 3])
    fresh = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    assert fresh.set_aside == tmp_path / "metrics.jsonl.1"
    assert [r["step"] for r in read_metrics(fresh.set_aside)] == [1, 2, 3]
    for step in (1, 2, 3):
        fresh.write({"step": step, "loss": math.nan if step == 2 else 1.0})
    resumed = MetricsWriter(tmp_path, enabled=True, tensorboard=False, resume_step=2)
    resumed.write({"step": 3, "loss": 0.5})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [_strict(line)["loss"] for line in lines] == [1.0, None, 0.5]


# --------------------------------------------------------------------------------------
# the non-finite guard
# --------------------------------------------------------------------------------------


def _health_when(rank, bad_loss_rank, bad_grad_rank, signal_rank):
    model = torch.nn.Linear(4, 4)
    for param in model.parameters():
        param.main_grad = torch.ones_like(param)
    if rank == bad_grad_rank:
        model.weight.main_grad[1, 2] = math.inf
    loss = torch.tensor(math.nan if rank == bad_loss_rank else 2.5)
    health = step_health(loss, model, signal.SIGTERM if rank == signal_rank else None)
    with torch.no_grad():
        if rank == 1:
            model.bias[0] = math.nan
    return health, first_nonfinite_weight(model)


def test_ranks_agree_on_a_non_finite_loss_gradient_and_stop_signal():
    results = run_distributed(_health_when, world_size=2, args=(1, 0, 1))
    assert results[0] == results[1]
    health, weight = results[0]
    assert health == StepHealth(nonfinite_loss=(1,), nonfinite_grad=(0,),
                                stop_requested=("SIGTERM",))
    assert not health.finite
    assert health.describe() == "non-finite loss on rank 1 and gradient on rank 0"
    assert weight == "rank 1: bias"
    healthy = run_distributed(_health_when, world_size=2, args=(-1, -1, -1))[0][0]
    assert healthy.finite and healthy.stop_requested == ()


def test_skip_counter_stops_after_max_consecutive_skips():
    bad = StepHealth(nonfinite_loss=(0,), nonfinite_grad=(), stop_requested=())
    good = StepHealth(nonfinite_loss=(), nonfinite_grad=(), stop_requested=())
    counter = SkipCounter(max_consecutive=2)
    assert "update skipped (1 in a row, 1 in all" in counter.after_step(1, bad, "latest: 0")
    assert counter.after_step(2, bad, "latest: 0") is not None
    assert counter.after_step(3, good, "latest: 0") is None  # the streak ends
    counter.after_step(4, bad, "latest: 0")
    counter.after_step(5, bad, "latest: 0")
    with pytest.raises(NonFiniteError) as err:
        counter.after_step(6, bad, "the latest checkpoint is step 3")
    assert "step 6: non-finite loss on rank 0 for 3 consecutive steps" in str(err.value)
    assert "the latest checkpoint is step 3" in str(err.value) and counter.total == 5


# --------------------------------------------------------------------------------------
# stop signals
# --------------------------------------------------------------------------------------


def _in_child(body) -> tuple[int, str]:
    """``body(write)`` in a forked child (the modules this process loaded, none imported
    again); its exit code and what it wrote (with ``write`` or on stderr)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        os.close(read_end)
        os.dup2(write_end, 2)
        try:
            body(lambda text: os.write(write_end, text.encode()))
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as out:
        written = out.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), written


def test_first_signal_is_recorded_and_a_second_exits_at_once():
    def body(write):
        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGUSR1)
            write(f"first: {stop.received.name}\n")
            os.kill(os.getpid(), signal.SIGTERM)
            write("not reached\n")

    code, written = _in_child(body)
    assert code == 128 + signal.SIGTERM
    assert written == ("first: SIGUSR1\npretrain_grove.py: second signal (SIGTERM): exiting now "
                       "without saving\n")


def test_a_worker_is_signalled_once_when_its_launcher_dies():
    """The grandchild of this process is signalled once when its parent exits (torchrun
    killed -> its workers get SIGTERM)."""
    def body(write):
        if os.fork() != 0:
            time.sleep(0.2)
            os._exit(0)  # the "launcher" dies; its child lives on
        got = []
        signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))
        signal_when_parent_dies(signal.SIGUSR2, poll_s=0.05)
        deadline = time.monotonic() + 20
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # a second signal would arrive meanwhile
        write(str(got))

    code, written = _in_child(body)  # the pipe stays open until the grandchild is done
    assert code == 0 and written == f"[{signal.SIGUSR2.value}]"


# --------------------------------------------------------------------------------------
# pre-flight
# --------------------------------------------------------------------------------------


def test_unwritable_folder_is_named(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    problem = writable_dir_problem("checkpoint.save", tmp_path / "file" / "ckpt", rank=0)
    assert problem.startswith(f"checkpoint.save={tmp_path / 'file' / 'ckpt'}: cannot write")
    assert writable_dir_problem("logging.dir", tmp_path / "new" / "dir", rank=0) is None


def test_dataset_files_are_checked_against_each_other(tmp_path):
    from megatron_grove.data.datasets import tokenize_to_indexed_dataset
    from megatron_grove.data.tokenizer import load_tokenizer

    prefix = str(tmp_path / "data")
    assert f"{prefix}.idx does not exist" in dataset_problem(prefix)
    tokenize_to_indexed_dataset(["to be or not to be", "that is the question"], prefix,
                                load_tokenizer())
    assert dataset_problem(prefix) is None
    size = os.path.getsize(f"{prefix}.bin")
    os.truncate(f"{prefix}.bin", size - 2)
    assert dataset_problem(prefix) == (
        f"data.path={prefix}: {prefix}.bin has {size - 2} bytes but its index points to {size}; "
        "the .bin is truncated or belongs to another .idx: preprocess it again")
    os.truncate(f"{prefix}.idx", 10)
    assert f"{prefix}.idx is truncated: 10 bytes" in dataset_problem(prefix)
    # an empty dataset (our preprocessing refuses to write one; Megatron's builder does not)
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    IndexedDatasetBuilder(f"{prefix}.bin").finalize(f"{prefix}.idx")
    assert "the dataset holds no tokens" in dataset_problem(prefix)


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------


def test_a_full_disk_is_named_with_where(tmp_path):
    from torch.distributed.checkpoint.api import CheckpointException

    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ckpt/.iter_0000002.tmp/__1_0.distcp")
    assert disk_full(RuntimeError("save failed")) is None
    assert disk_full(RuntimeError("save failed"), where=tmp_path) is None  # it has room
    assert disk_full(full) == "no space left on device writing /ckpt/.iter_0000002.tmp/__1_0.distcp"
    # as torch's checkpoint writer reports a worker's failure from another rank: flattened
    flattened = RuntimeError("Worker failure: [Errno 28] No space left on device: "
                             "'/ckpt/x.distcp'")
    wrapped = CheckpointException("save", {1: (flattened, None)})
    assert disk_full(wrapped) == "no space left on device writing /ckpt/x.distcp"
    try:
        try:
            raise full
        except OSError as exc:
            raise RuntimeError("writer failed") from exc
    except RuntimeError as chained:
        assert disk_full(chained).startswith("no space left on device writing /ckpt/")


def test_a_token_id_outside_the_vocabulary_is_refused_before_the_model_runs():
    from megatron_grove.evaluation import perplexity

    for bad, needle in ((-3, "token id -3"), (10, "token id 10")):
        tokens = torch.tensor([1, 2, bad, 4, 5, 6, 7, 8, 9])
        with pytest.raises(ValueError, match=f"{needle} is outside the model's vocabulary of "
                                             "10 .ids 0..9."):
            perplexity(None, tokens, seq_length=4, vocab_size=10)


def _announce(rank):
    if rank == 1:
        return announce_failure(1, "checkpoint error: /x: checksum mismatch"), None
    import time

    time.sleep(0.5)
    return announce_failure(0, "a later failure"), first_failure(wait_s=5)


def test_the_first_failing_rank_prints_and_its_peers_can_name_it():
    (later_first, note), (first, _) = run_distributed(_announce, world_size=2)
    assert first is True and later_first is False
    assert note == "rank 1: checkpoint error: /x: checksum mismatch"

