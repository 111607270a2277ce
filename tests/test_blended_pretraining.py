"""Pretraining on a blend of two corpora with validation, under real torchrun (2 gloo
processes, EP=2): the samples drawn from each corpus reported at start, validation at intervals
printed and logged, and a resumed run that reproduces the uninterrupted one exactly, validation
losses included."""

import re
from pathlib import Path

import pytest

from megatron_grove.data import embedded_train_files, tokenize_to_indexed_dataset
from megatron_grove.data.datasets import split_into_documents
from megatron_grove.data.tokenizer import load_tokenizer
from megatron_grove.training.metrics import read_metrics
from processes import losses, torchrun

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> str:
    """``data.path`` of a 0.7 / 0.3 blend of two corpora: two plays each, cut into documents."""
    root = tmp_path_factory.mktemp("corpora")
    tokenizer = load_tokenizer()
    plays = embedded_train_files()
    for name, files in (("tragedies", plays[:2]), ("others", plays[2:])):
        documents = [d for f in files for d in split_into_documents(Path(f).read_text())]
        tokenize_to_indexed_dataset(documents, str(root / name), tokenizer)
    return f"data.path=[[0.7,{root / 'tragedies'}],[0.3,{root / 'others'}]]"


RUN = ("parallel.expert_model_parallel_size=2", "data.split=90,10,0", "train.eval_interval=4",
       "train.eval_iters=2")


@pytest.fixture(scope="module")
def straight(blend, tmp_path_factory):
    log = tmp_path_factory.mktemp("straight")
    proc = torchrun(*RUN, blend, f"logging.dir={log}")
    return log, proc.stdout


def test_blend_reports_its_samples_and_validates_at_intervals(straight):
    log, out = straight
    drawn = [int(n) for n in re.findall(r"data: +(\d+) samples \(", out)]
    assert len(drawn) == 4, out  # training: 2 corpora, validation: 2 corpora
    assert sum(drawn[:2]) == 64 and abs(drawn[0] - 0.7 * 64) <= 1  # 8 steps x 8 sequences
    assert sum(drawn[2:]) == 16 and abs(drawn[2] - 0.7 * 16) <= 1  # 2 batches x 8
    assert "weight 0.700) from " in out and "weight 0.300) from " in out
    records = read_metrics(log / "metrics.jsonl")
    validated = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert sorted(validated) == [4, 8]
    for step, value in validated.items():
        assert f"validation at step {step}/8: loss {value:.4f}" in out
    assert validated[8] < validated[4]  # it learns


def test_resume_with_a_blend_and_validation_is_exact(blend, straight, tmp_path):
    log, _ = straight
    ckpt, resumed_log = tmp_path / "ckpt", tmp_path / "log"
    torchrun(*RUN, blend, "train.exit_at_iter=4", f"checkpoint.save={ckpt}",
             f"logging.dir={resumed_log}")
    torchrun(*RUN, blend, f"checkpoint.load={ckpt}", f"logging.dir={resumed_log}")
    resumed, uninterrupted = losses(resumed_log), losses(log)
    assert sorted(resumed) == list(range(1, 9))
    assert all(resumed[step] == uninterrupted[step] for step in resumed), (resumed, uninterrupted)
    validations = [{r["step"]: r["val_loss"] for r in read_metrics(d / "metrics.jsonl")
                    if "val_loss" in r} for d in (resumed_log, log)]
    assert validations[0] == validations[1] and sorted(validations[0]) == [4, 8]
