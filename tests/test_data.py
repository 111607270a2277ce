"""Tests of the tokenizer, the preprocessing CLI and the Megatron GPTDataset pipeline (CPU)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from megatron.core.datasets.indexed_dataset import IndexedDataset

from helpers import ROOT, run_script
from megatron_grove.data import build_gpt_dataset, embedded_corpus_prefix, heldout_text_path
from megatron_grove.data import datasets as data
from megatron_grove.data.tokenizer import default_tokenizer_path, load_tokenizer

PREPROCESS = ROOT / "tools" / "preprocess_data.py"


def _load_preprocess_module():
    """The tool's module, to call its ``main`` in this process."""
    spec = importlib.util.spec_from_file_location("preprocess_data", PREPROCESS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("grove_cache"))


def test_tokenizer_round_trips_real_text(tokenizer) -> None:
    text = Path(heldout_text_path()).read_text(encoding="utf-8")
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text) / 2.5  # real merges, not bytes
    assert tokenizer.vocab_size == 4096
    assert max(ids) < tokenizer.vocab_size
    assert tokenizer.eod == 0 and tokenizer.pad == 1
    assert tokenizer.decode([tokenizer.eod]) == "<|endoftext|>"


def test_load_tokenizer_from_hf_style_directory(tmp_path, tokenizer) -> None:
    shutil.copy(default_tokenizer_path(), tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "<|pad|>"}, "pad_token": None})
    )
    loaded = load_tokenizer(str(tmp_path))
    assert loaded.encode("Fair is foul") == tokenizer.encode("Fair is foul")
    assert loaded.eod == 1
    with pytest.raises(FileNotFoundError):
        load_tokenizer(str(tmp_path / "missing"))


def test_preprocess_txt_and_jsonl_round_trip(tmp_path, tokenizer, capsys) -> None:
    docs = ["When shall we three meet again?\n", "In thunder, lightning, or rain?", "Fair is foul"]
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    with open(tmp_path / "b.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"text": docs[1]}) + "\n\n")  # blank lines are skipped
        f.write(json.dumps({"text": docs[2], "id": 7}) + "\n")
    prefix = str(tmp_path / "out" / "ds")

    status = _load_preprocess_module().main(
        ["--input", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), "--output-prefix", prefix]
    )

    assert status == 0
    dataset = IndexedDataset(prefix)
    assert len(dataset.document_indices) - 1 == len(docs)
    expected = [tokenizer.encode(doc) + [tokenizer.eod] for doc in docs]
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert dataset[0].dtype == numpy.uint16
    total = sum(map(len, expected))
    assert f"{len(docs)} documents, {total} tokens" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "out")) == ["ds.bin", "ds.idx"]  # no temporaries left


def test_preprocess_missing_input_fails_cleanly(tmp_path, capsys) -> None:
    status = _load_preprocess_module().main(
        ["--input", str(tmp_path / "nope.txt"), "--output-prefix", str(tmp_path / "ds")]
    )
    assert status == 2
    expected = f"preprocess_data.py: error: input file not found: {tmp_path / 'nope.txt'}"
    assert capsys.readouterr().err.strip() == expected


@pytest.mark.e2e
def test_preprocess_bad_json_key_exits_with_one_line(tmp_path) -> None:
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    result = run_script("tools/preprocess_data.py", "--input", str(tmp_path / "c.jsonl"),
                        "--output-prefix", str(tmp_path / "ds"), timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line == f"preprocess_data.py: error: {tmp_path / 'c.jsonl'}:1: no key 'text'"
    assert not list(tmp_path.glob("ds*"))


def test_embedded_corpus_prefix_is_idempotent(cache_dir, tokenizer, monkeypatch) -> None:
    prefix = embedded_corpus_prefix(cache_dir)
    mtime = os.path.getmtime(prefix + ".idx")
    dataset = IndexedDataset(prefix)
    assert len(dataset) == len(data.embedded_train_files())
    assert dataset[0].tolist()[-1] == tokenizer.eod

    def fail(*args, **kwargs):
        raise AssertionError("cache not reused")

    monkeypatch.setattr(data, "tokenize_to_indexed_dataset", fail)
    assert embedded_corpus_prefix(cache_dir) == prefix
    assert os.path.getmtime(prefix + ".idx") == mtime


def test_build_gpt_dataset_samples(cache_dir, tokenizer) -> None:
    seq_length, num_samples = 64, 100
    prefix = embedded_corpus_prefix(cache_dir)
    dataset = build_gpt_dataset(prefix, seq_length, num_samples, 1234, tokenizer,
                                cache_dir=cache_dir)
    assert len(dataset) >= num_samples
    tokens_seen = set()
    for i in range(0, len(dataset), len(dataset) // 10):
        sample = dataset[i]
        assert sample["tokens"].shape == (seq_length,)
        assert sample["labels"].shape == (seq_length,)
        assert torch.equal(sample["labels"][:-1], sample["tokens"][1:])
        assert torch.equal(sample["position_ids"], torch.arange(seq_length))
        assert torch.all(sample["loss_mask"] == 1.0)
        assert sample["attention_mask"].shape == (1, seq_length, seq_length)
        tokens_seen.add(tuple(sample["tokens"].tolist()))
    assert len(tokens_seen) > 5
    again = build_gpt_dataset(prefix, seq_length, num_samples, 1234, tokenizer, cache_dir=cache_dir)
    assert torch.equal(again[3]["tokens"], dataset[3]["tokens"])


def _gloo_worker(rank: int, world_size: int, store_path: str, cache_dir: str,
                 result_dir: str) -> None:
    # A forked child hangs in its first OpenMP-parallel op (GNU libgomp is not fork-safe) once
    # the parent has run one, as earlier tests did; DataLoader workers avoid it the same way.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        tokenizer = load_tokenizer()
        dataset = build_gpt_dataset(embedded_corpus_prefix(cache_dir), 32, 50, 99, tokenizer,
                                    cache_dir=cache_dir)
        tokens = torch.stack([dataset[i]["tokens"] for i in range(4)])
        torch.save({"len": len(dataset), "tokens": tokens}, os.path.join(result_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_build_gpt_dataset_under_gloo(tmp_path) -> None:
    cache, results = tmp_path / "cache", tmp_path / "results"
    results.mkdir()
    mp.start_processes(_gloo_worker, args=(2, str(tmp_path / "store"), str(cache), str(results)),
                       nprocs=2, start_method="fork")
    rank0, rank1 = (torch.load(results / f"{r}.pt") for r in range(2))
    assert rank0["len"] == rank1["len"] >= 50
    assert torch.equal(rank0["tokens"], rank1["tokens"])
