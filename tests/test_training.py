"""End-to-end pretraining under real torchrun (2 gloo processes): losses across parallel
layouts, exact resume, logging outputs, and the command-line behaviour."""

import math

import pytest

from megatron_grove.training.metrics import read_metrics
from processes import TINY, losses, run_script, torchrun

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def straight_ep2(tmp_path_factory):
    """8 uninterrupted steps at EP=2 (shared by several tests)."""
    log = tmp_path_factory.mktemp("ep2")
    proc = torchrun("parallel.expert_model_parallel_size=2", f"logging.dir={log}")
    (log / "stdout.txt").write_text(proc.stdout)
    return log


def test_loss_falls_and_metrics_are_complete(straight_ep2):
    records = read_metrics(straight_ep2 / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "expert_load",
                "tokens_per_s_per_device", "model_flops_per_token", "tflops_per_device"} <= set(r)
        assert "mfu" not in r  # CPU: no peak, no MFU
        assert len(r["expert_load"]) == 2 and all(len(layer) == 8 for layer in r["expert_load"])
        # every (token, choice) of the global batch is counted once per layer
        assert all(sum(layer) == 8 * 32 * 2 for layer in r["expert_load"])
        assert r["tflops_per_device"] == pytest.approx(
            r["model_flops_per_token"] * r["tokens_per_s_per_device"] / 1e12)
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    assert list((straight_ep2 / "tensorboard").glob("events.out.tfevents.*"))


def test_tiny_config_validates_after_the_last_step(straight_ep2):
    """The tiny config (README command 1) holds out 5% of the embedded corpus and validates
    every 50 steps and after the last: in 8 steps, once, printed and logged."""
    records = read_metrics(straight_ep2 / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [8]
    assert 0 < records[-1]["val_loss"] < 9 and records[-1]["val_ppl"] == pytest.approx(
        math.exp(records[-1]["val_loss"]))
    out = (straight_ep2 / "stdout.txt").read_text()
    assert "data: validation on 32 samples (4 batches x 8, the same at every validation), " \
        "split 95,5,0:" in out
    assert f"validation at step 8/8: loss {records[-1]['val_loss']:.4f}" in out
    assert f"validation loss {records[-1]['val_loss']:.4f}" in out.splitlines()[-1]  # done: ...


def test_expert_parallel_matches_data_parallel(straight_ep2, tmp_path):
    """The same model at EP=1 and EP=2: the same training losses and validation loss."""
    torchrun("parallel.expert_model_parallel_size=1", f"logging.dir={tmp_path}")
    ep1, ep2 = losses(tmp_path), losses(straight_ep2)
    assert ep1.keys() == ep2.keys()
    for step in ep1:
        assert ep1[step] == pytest.approx(ep2[step], rel=1e-5), step
    val1, val2 = (read_metrics(log / "metrics.jsonl")[-1]["val_loss"]
                  for log in (tmp_path, straight_ep2))
    assert val1 == pytest.approx(val2, rel=1e-5)


def test_triton_kernels_train_like_torch_kernels(straight_ep2, tmp_path):
    """kernels.backend=triton (SwiGLU kernel in every MLP; permute, unpermute and Grove combine
    kernels in the group-aware dispatch; Triton's interpreter on CPU, set in conftest.py): the
    first 3 steps' losses equal the torch-backend run's (the default dispatcher, same model)."""
    torchrun("parallel.expert_model_parallel_size=2", "moe.token_dispatcher_type=grove_alltoall",
             "train.exit_at_iter=3", "kernels.backend=triton", f"logging.dir={tmp_path}")
    with_triton, with_torch = losses(tmp_path), losses(straight_ep2)
    assert sorted(with_triton) == [1, 2, 3]
    for step in with_triton:
        assert with_triton[step] == pytest.approx(with_torch[step], rel=1e-5), step


def test_resume_is_identical_to_uninterrupted(straight_ep2, tmp_path):
    ckpt, log = tmp_path / "ckpt", tmp_path / "log"
    torchrun("parallel.expert_model_parallel_size=2", "train.exit_at_iter=4",
             f"checkpoint.save={ckpt}", f"logging.dir={log}")
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "4"
    torchrun("parallel.expert_model_parallel_size=2", f"checkpoint.load={ckpt}",
             f"logging.dir={log}")
    resumed, straight = losses(log), losses(straight_ep2)
    assert sorted(resumed) == list(range(1, 9))  # the log continues, one record per step
    for step in range(5, 9):
        assert resumed[step] == straight[step], step
    assert read_metrics(log / "metrics.jsonl")[-1]["val_loss"] == \
        read_metrics(straight_ep2 / "metrics.jsonl")[-1]["val_loss"]


@pytest.fixture(scope="module")
def ep2_checkpoints(tmp_path_factory):
    """The first 4 of straight_ep2's steps, checkpointed at EP=2: with the plain optimizer
    ("plain"), the distributed optimizer ("distributed", fully_reshardable format) and the
    distributed optimizer in the dp_reshardable format ("dp_reshardable")."""
    root = tmp_path_factory.mktemp("ep2_ckpt")
    for optimizer in ("plain", "distributed", "dp_reshardable"):
        fmt = "dp_reshardable" if optimizer == "dp_reshardable" else "fully_reshardable"
        torchrun("parallel.expert_model_parallel_size=2", "train.exit_at_iter=4",
                 f"parallel.use_distributed_optimizer={optimizer != 'plain'}",
                 f"checkpoint.optimizer_format={fmt}",
                 f"checkpoint.save={root / optimizer}", f"logging.dir={root / optimizer}-log")
    return root


TP2 = ("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")


@pytest.mark.parametrize("optimizer, layout, nproc", [
    ("plain", ("parallel.expert_model_parallel_size=1",), 2),
    ("plain", ("parallel.expert_model_parallel_size=4",), 4),
    ("plain", ("parallel.expert_model_parallel_size=1", *TP2), 2),
    ("plain", ("parallel.expert_model_parallel_size=2", *TP2), 4),
    ("distributed", ("parallel.expert_model_parallel_size=1",), 2),
    ("distributed", ("parallel.expert_model_parallel_size=4",), 4),
], ids=["ep1", "ep4", "tp2-ep1", "tp2-ep2", "distopt-ep1", "distopt-ep4"])
def test_resume_under_another_layout_continues_the_run(straight_ep2, ep2_checkpoints, tmp_path,
                                                       optimizer, layout, nproc):
    """Saved at EP=2, resumed at another EP/TP size (Megatron reshards the model and the Adam
    state on load): steps 5-8 lose what the run that kept EP=2 lost."""
    torchrun(*layout, f"parallel.use_distributed_optimizer={optimizer == 'distributed'}",
             f"checkpoint.load={ep2_checkpoints / optimizer}", f"logging.dir={tmp_path}",
             nproc=nproc)
    resumed, straight = losses(tmp_path), losses(straight_ep2)
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6, abs=0), step


def test_dp_reshardable_checkpoint_refuses_another_layout(ep2_checkpoints, tmp_path):
    proc = torchrun("parallel.expert_model_parallel_size=1",
                    "parallel.use_distributed_optimizer=true",
                    f"checkpoint.load={ep2_checkpoints / 'dp_reshardable'}",
                    f"logging.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "checkpoint error" in line]
    assert len(ours) == 1 and "[rank0]: Traceback" not in proc.stderr
    assert ours[0].startswith("pretrain_grove.py: checkpoint error: ")
    assert ("saved with checkpoint.optimizer_format=dp_reshardable at TP=1, EP=2 and loads only "
            "at those sizes (this run: TP=1, EP=1)") in ours[0]


def test_bf16_run_checkpoints_and_resumes(tmp_path):
    """bf16 weights (Megatron's Float16Module + its bf16 optimizer with fp32 main params):
    the checkpoint saves, resumes exactly at the same EP size, and at EP=1 continues within
    bf16 rounding of the different reduction order."""
    bf16 = ("runtime.dtype=bf16", "train.iters=6")
    torchrun(*bf16, f"logging.dir={tmp_path / 'straight'}")
    torchrun(*bf16, "train.exit_at_iter=3", f"checkpoint.save={tmp_path / 'ckpt'}",
             f"logging.dir={tmp_path / 'first'}")
    straight = losses(tmp_path / "straight")
    for ep, rel in ((2, 0.0), (1, 1e-4)):
        torchrun(*bf16, f"parallel.expert_model_parallel_size={ep}",
                 f"checkpoint.load={tmp_path / 'ckpt'}", f"logging.dir={tmp_path / str(ep)}")
        resumed = losses(tmp_path / str(ep))
        assert sorted(resumed) == [4, 5, 6]
        for step in resumed:
            assert resumed[step] == pytest.approx(straight[step], rel=rel, abs=0), (ep, step)


def test_bad_config_is_one_line_and_nonzero_exit():
    proc = run_script("launch/pretrain_grove.py", "--config", str(TINY), "train.iterz=5",
                      timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["pretrain_grove.py: config error: unknown key train.iterz; allowed in train: "
                     + lines[0].split("allowed in train: ")[1]]
    assert "Traceback" not in proc.stderr


def test_bad_layout_under_torchrun_names_the_key():
    proc = torchrun("parallel.expert_model_parallel_size=3", check=False)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if "config error" in line]
    assert ours == ["pretrain_grove.py: config error: parallel.expert_model_parallel_size=3: "
                    "must divide the data-parallel size 2 (= world size 2 / (tp 1 x pp 1)); "
                    "allowed: 1, 2"]
    assert "Traceback" not in proc.stdout


def test_help_explains_overrides():
    proc = run_script("launch/pretrain_grove.py", "--help", timeout=60)
    assert proc.returncode == 0
    for needle in ["--config", "key=value", "train.iters", "checkpoint.save", "metrics.jsonl",
                   "checkpoint.overwrite", "train.max_skipped_steps", "exit codes",
                   "4 preempted by a signal", "--shutdown-timeout"]:
        assert needle in proc.stdout
