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

from megatron_grove.config import ConfigError
from megatron_grove.data import (
    build_gpt_datasets,
    check_sources,
    embedded_corpus_prefix,
    embedded_train_documents,
    heldout_text_path,
    samples_per_prefix,
    tokenize_to_indexed_dataset,
)
from megatron_grove.data import datasets as data
from megatron_grove.data import preprocess as preprocessing
from megatron_grove.data.datasets import split_into_documents
from megatron_grove.data.tokenizer import default_tokenizer_path, load_tokenizer
from processes import ROOT, run_script

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
    assert len(dataset) == len(embedded_train_documents()) > 100  # plays cut into ~4 KB
    assert dataset[0].tolist()[-1] == tokenizer.eod

    def fail(*args, **kwargs):
        raise AssertionError("cache not reused")

    monkeypatch.setattr(data, "tokenize_to_indexed_dataset", fail)
    assert embedded_corpus_prefix(cache_dir) == prefix
    assert os.path.getmtime(prefix + ".idx") == mtime


def _train_only(prefix, seq_length, num_samples, seed, tokenizer, cache_dir):
    """Every document of ``prefix`` for training (split 100,0,0)."""
    train, valid = build_gpt_datasets(([prefix], None), None, "100,0,0", seq_length,
                                      (num_samples, 0), seed, tokenizer, cache_dir=cache_dir)
    assert valid is None
    return train


def test_build_gpt_dataset_samples(cache_dir, tokenizer) -> None:
    seq_length, num_samples = 64, 100
    prefix = embedded_corpus_prefix(cache_dir)
    dataset = _train_only(prefix, seq_length, num_samples, 1234, tokenizer, cache_dir)
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
    again = _train_only(prefix, seq_length, num_samples, 1234, tokenizer, cache_dir)
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
        dataset = _train_only(embedded_corpus_prefix(cache_dir), 32, 50, 99, tokenizer, cache_dir)
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


# --------------------------------------------------------------------------------------
# the embedded corpus as documents; Megatron's split strings and blends
# --------------------------------------------------------------------------------------


def test_split_into_documents_cuts_after_blank_lines_and_keeps_everything() -> None:
    text = "".join(f"para {i} " + "x" * (i * 37 % 300) + "\n\n" for i in range(200)) + "tail"
    documents = split_into_documents(text, min_chars=1000)
    assert "".join(documents) == text
    assert all(len(d) >= 1000 and d.endswith("\n\n") for d in documents[:-1])
    assert documents[-1].endswith("tail") and len(documents) > 10
    assert split_into_documents("short", min_chars=1000) == ["short"]
    plays = [Path(p).read_text(encoding="utf-8") for p in data.embedded_train_files()]
    assert "".join(embedded_train_documents()) == "".join(plays)


def _documents(tmp_path, name: str, tokenizer, texts: list[str]) -> str:
    prefix = str(tmp_path / name)
    tokenize_to_indexed_dataset(texts, prefix, tokenizer)
    return prefix


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory, tokenizer) -> tuple[str, str, set, set]:
    """Two prefixes of 20 documents each whose token sets share only the end-of-document id:
    one of words in 'a'/'b', one of words in 'x'/'y'."""
    root = tmp_path_factory.mktemp("corpora")
    corpora = {}
    for name, letters in (("ab", "ab"), ("xy", "xy")):
        texts = [" ".join(letters[(i + j) % 2] * (1 + (i * j) % 5) for j in range(300))
                 for i in range(20)]
        prefix = _documents(root, name, tokenizer, texts)
        ids = {t for text in texts for t in tokenizer.encode(text)}
        corpora[name] = (prefix, ids)
    (a, a_ids), (x, x_ids) = corpora["ab"], corpora["xy"]
    assert not a_ids & x_ids
    return a, x, a_ids, x_ids


def test_split_string_cuts_each_prefix_in_document_order(two_corpora, tokenizer,
                                                         cache_dir) -> None:
    a, _, _, _ = two_corpora
    train, valid = build_gpt_datasets(([a], None), None, "80,20,0", 32, (50, 10), 7, tokenizer,
                                      cache_dir=cache_dir)
    assert set(train.document_index.tolist()) == set(range(0, 16))  # Megatron: in order
    assert set(valid.document_index.tolist()) == set(range(16, 20))
    assert len(train) >= 50 and len(valid) >= 10


def test_blend_draws_each_prefix_by_its_weight(two_corpora, tokenizer, cache_dir) -> None:
    a, x, a_ids, x_ids = two_corpora
    n = 1000
    train, valid = build_gpt_datasets(([a, x], [0.7, 0.3]), None, "90,10,0", 16, (n, 40), 3,
                                      tokenizer, cache_dir=cache_dir)
    for first in (10, 99, 500, n):  # Megatron's greedy blending: within one sample of w * n
        counts = samples_per_prefix(train, first)
        assert abs(counts[0] - 0.7 * first) <= 1 and abs(counts[1] - 0.3 * first) <= 1, counts
    assert samples_per_prefix(train, n) == [700, 300]
    assert samples_per_prefix(valid, 40) == [28, 12]
    for i in range(0, 200, 7):  # each sample really comes from the prefix it is counted for
        sample = train[i]
        ids = set(sample["tokens"].tolist()) - {tokenizer.eod}
        assert ids <= (a_ids if sample["dataset_id"] == 0 else x_ids), i


def test_separate_validation_data(two_corpora, tokenizer, cache_dir) -> None:
    a, x, a_ids, x_ids = two_corpora
    train, valid = build_gpt_datasets(([a], None), ([x], None), None, 16, (30, 20), 3, tokenizer,
                                      cache_dir=cache_dir)
    assert set(train.document_index.tolist()) == set(range(20))  # all of the training data
    for i in range(20):
        assert set(valid[i]["tokens"].tolist()) - {tokenizer.eod} <= x_ids
        assert set(train[i]["tokens"].tolist()) - {tokenizer.eod} <= a_ids


def test_check_sources_refuses_missing_data_and_empty_split_parts(two_corpora, tmp_path) -> None:
    a, _, _, _ = two_corpora
    check_sources(([a], None), None, "90,10,0")
    with pytest.raises(ConfigError, match=r"^data.valid_path=.*nope: .*nope.idx does not exist; "
                                          r"give the prefix of a .bin/.idx pair written by "
                                          r"tools/preprocess_data.py$"):
        check_sources(([a], None), ([str(tmp_path / "nope")], None), None)
    with pytest.raises(ConfigError, match=r"^data.split=99,1,0: its validation part gets none "
                                          r"of the 20 documents of .*ab; raise that share"):
        check_sources(([a], None), None, "99,1,0")


# --------------------------------------------------------------------------------------
# preprocessing: workers, progress, refusals
# --------------------------------------------------------------------------------------


def _corpus_files(tmp_path) -> list[str]:
    plays = data.embedded_train_files()
    with open(tmp_path / "docs.jsonl", "w", encoding="utf-8") as f:
        for path in plays[:2]:
            for i, document in enumerate(split_into_documents(Path(path).read_text())):
                f.write(json.dumps({"id": i, "body": document}) + "\n")
        f.write(json.dumps({"id": -1, "body": ""}) + "\n")  # empty: skipped
    return [str(tmp_path / "docs.jsonl"), plays[2]]


def test_preprocess_workers_write_the_same_dataset(tmp_path, tokenizer, capsys,
                                                   monkeypatch) -> None:
    monkeypatch.setattr(preprocessing, "CHUNK_BYTES", 20_000)  # many chunks in flight
    files = _corpus_files(tmp_path)
    tool = _load_preprocess_module()
    for workers in (1, 2):
        status = tool.main(["--input", *files, "--output-prefix", str(tmp_path / f"w{workers}"),
                            "--json-key", "body", "--workers", str(workers), "--no-progress"])
        assert status == 0
        out = capsys.readouterr().out
        assert "documents (1 empty skipped)" in out and " MB/s, " in out, out
        assert f"tokens/s with {workers} worker(s)" in out
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"w1{suffix}").read_bytes() == (tmp_path / f"w2{suffix}").read_bytes()
    dataset = IndexedDataset(str(tmp_path / "w2"))
    texts = [json.loads(line)["body"] for line in open(files[0], encoding="utf-8")][:-1]
    texts.append(Path(files[1]).read_text(encoding="utf-8"))
    assert len(dataset) == len(texts)
    for i in (0, 7, len(texts) - 1):
        assert dataset[i].tolist() == tokenizer.encode(texts[i]) + [tokenizer.eod]


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_refuses_bad_input_and_leaves_nothing(tmp_path, capsys, monkeypatch,
                                                         workers) -> None:
    monkeypatch.setattr(preprocessing, "CHUNK_BYTES", 20_000)
    files = _corpus_files(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n" + json.dumps({"body": ""}) + "\n")
    (tmp_path / "latin1.txt").write_bytes("Fair is foul\n".encode() + b"\xe9t\xe9")
    late_error = tmp_path / "late.jsonl"  # a bad line after many good chunks were written
    late_error.write_text(Path(files[0]).read_text() + "{not json\n")
    cases = [
        ([str(tmp_path / "empty.txt")], f"no documents in {tmp_path / 'empty.txt'} (empty "
                                        "input); nothing written"),
        ([str(tmp_path / "blank.jsonl")], "(empty input); nothing written"),
        ([str(tmp_path / "latin1.txt")], f"{tmp_path / 'latin1.txt'}: not UTF-8 text (byte "
                                         "0xe9 at offset 13)"),
        ([str(tmp_path)], f"{tmp_path}: not a file"),
        ([str(late_error)], f"{late_error}:{len(Path(files[0]).read_text().splitlines()) + 1}: "
                            "invalid JSON (Expecting property name enclosed in double quotes)"),
    ]
    before = sorted(os.listdir(tmp_path))
    for inputs, message in cases:
        status = _load_preprocess_module().main(
            ["--input", *inputs, "--output-prefix", str(tmp_path / "out"), "--json-key", "body",
             "--workers", str(workers), "--no-progress"])
        assert status == 2
        assert capsys.readouterr().err.strip().endswith(message), message
        assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary left
