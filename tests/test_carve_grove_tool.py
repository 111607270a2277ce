"""tools/carve_grove.py end to end on a tiny random Hugging Face Llama (d_ffn % N != 0): with
every routed expert active the Megatron Grove checkpoint it writes has the dense model's
perplexity (< 1e-4 relative), a sparse carving does not; the carving record; a short real
torchrun training run (EP=2) starts from the carved checkpoint with finite losses and counts
adjugate evaluations; bad input exits with code 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_models
from megatron_grove.data.tokenizer import default_tokenizer_path
from megatron_grove.training.metrics import read_metrics
from processes import LAUNCH, child_env, free_port, losses, run_script

pytestmark = pytest.mark.e2e

SEQ = 32


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_models.tiny_llama(path, tokenizer_file=default_tokenizer_path(), vocab_size=4096,
                       hidden_size=32, intermediate_size=44, rope_theta=10000.0,
                       tie_word_embeddings=False, initializer_range=0.02)
    return path


def _carve(model: Path, out: Path, active: int, adjugate: int = 3) -> subprocess.CompletedProcess:
    """S1 of N=8 (m = 6 shared neurons), 2 groups of 2 experts + a 3-neuron adjugate: a group
    holds 7 * 6 / 2 = 21 neurons = 3 + 2 x 9, padded 6 + 2 x 21 = 48 > 44."""
    return run_script("tools/carve_grove.py", "--model", str(model), "--shared", "1",
                      "--experts", "8", "--groups", "2", "--experts-per-group", "2",
                      "--adjugate-size", str(adjugate), "--active", str(active), "--output",
                      str(out), "--calibration-tokens", "256", "--window", "64", "--seq-length",
                      str(SEQ), "--no-progress", timeout=600)


def _perplexity(checkpoint: Path, tokens: Path) -> float:
    done = run_script("tools/evaluate.py", "--checkpoint", str(checkpoint), "--tokens",
                      str(tokens), "--seq-length", str(SEQ), "--json", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])["ppl"]


def test_all_experts_active_is_the_dense_model_and_the_carving_trains(tiny_llama, tmp_path):
    done = _carve(tiny_llama, tmp_path / "all", active=4)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "carved S1E8-G2n2a3k4 (linear router) in" in done.stdout
    assert _carve(tiny_llama, tmp_path / "sparse", active=1).returncode == 0
    np.save(tmp_path / "tokens.npy", torch.randint(
        0, 4096, (4 * SEQ + 1,), generator=torch.Generator().manual_seed(0)).numpy())
    ppl = {name: _perplexity(path, tmp_path / "tokens.npy") for name, path in [
        ("dense", tiny_llama), ("all", tmp_path / "all" / "megatron"),
        ("sparse", tmp_path / "sparse" / "megatron")]}
    all_error, sparse_error = (abs(ppl[k] / ppl["dense"] - 1) for k in ("all", "sparse"))
    assert all_error < 1e-4 and sparse_error > 10 * all_error, ppl

    record = json.loads((tmp_path / "sparse" / "carve.json").read_text())
    assert (record["shared_neurons"], record["neurons_per_expert"],
            record["adjugate_neurons"], record["adjugate_scale"]) == (6, 9, 3, 0.5)
    assert min(record[k] for k in ("calibration_s", "clustering_s", "writing_s")) >= 0
    run_config = (tmp_path / "sparse" / "megatron" / "config.yaml").read_text()
    assert "num_expert_groups: 2" in run_config and "router_type: cmoe_linear" in run_config

    log_dir = tmp_path / "train"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(LAUNCH),
               "--config", str(tmp_path / "sparse" / "megatron" / "config.yaml"),
               f"checkpoint.load={tmp_path / 'sparse' / 'megatron'}",
               "parallel.expert_model_parallel_size=2", "train.iters=3",
               "train.lr_warmup_iters=1", "train.global_batch_size=4",
               "train.micro_batch_size=1", "train.lr=1e-3", "train.eval_iters=0",
               f"logging.dir={log_dir}", "logging.progress_bar=false"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env=child_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    steps = losses(log_dir)
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(v) for v in steps.values())
    # dense-model quality at step 1: near the carved model's own perplexity on random text
    assert steps[1] < math.log(4096) + 1
    # top-1: every token hits exactly one group, so one adjugate evaluation per token and layer
    assert read_metrics(log_dir / "metrics.jsonl")[-1]["adjugate_evals_per_token"] == [1.0, 1.0]


def test_bad_input_exits_with_code_2(tiny_llama, tmp_path):
    done = _carve(tiny_llama, tmp_path / "x", active=5)  # 2 groups x 2 experts
    assert done.returncode == 2 and "--active 5: allowed 1..4" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = _carve(tiny_llama, tmp_path / "y", active=2, adjugate=21)
    assert done.returncode == 2 and "--adjugate-size 21: must be below the 21" in done.stderr
    assert not (tmp_path / "y").exists()
