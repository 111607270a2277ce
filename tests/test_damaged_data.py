"""Damaged indexed datasets (truncated, cut, zero-filled, swapped .idx / .bin) are one line
naming the file, for any prefix of a training or validation blend, before anything is built;
and the training run stops with it, exit 2 (docs/fault_tolerance.md, "Pre-flight")."""

import os
import shutil
from pathlib import Path

import pytest

from processes import FAST, TINY, run_script
from megatron_grove.config import ConfigError
from megatron_grove.data.blends import check_sources
from megatron_grove.data.datasets import tokenize_to_indexed_dataset
from megatron_grove.data.integrity import indexed_dataset_problem
from megatron_grove.data.tokenizer import load_tokenizer


def _write(prefix: Path, words: str, documents: int = 30) -> str:
    texts = [" ".join(words.split()[(i + j) % 2] for j in range(200 + i)) for i in range(documents)]
    tokenize_to_indexed_dataset(texts, str(prefix), load_tokenizer())
    return str(prefix)


@pytest.fixture(scope="module")
def sound(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sound")
    _write(root / "web", "the cat")
    _write(root / "books", "a dog", 31)
    return root


@pytest.fixture
def pair(sound, tmp_path) -> tuple[str, str]:
    """Two sound prefixes of different sizes (a fresh copy per test)."""
    for file in sound.iterdir():
        shutil.copy(file, tmp_path / file.name)
    return str(tmp_path / "web"), str(tmp_path / "books")


def _zero(path: str, offset: int, length: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(length))


def _cut(path: str, by: int) -> None:
    os.truncate(path, os.path.getsize(path) - by)


def _damage(kind: str, prefix: str, other: str) -> str:
    """Damage ``prefix`` the way ``kind`` says; returns what the one line must contain."""
    idx, bin_ = f"{prefix}.idx", f"{prefix}.bin"
    size = os.path.getsize(bin_)
    if kind == "idx cut by one byte":
        _cut(idx, 1)
        return f"{idx} is truncated: "
    if kind == "idx shorter than its header":
        os.truncate(idx, 20)
        return f"{idx} is truncated: 20 bytes, shorter than the 34-byte header"
    if kind == "idx zero-filled":
        _zero(idx, 0, os.path.getsize(idx))
        return f"{idx} is not an index file: it starts with all zero bytes (zero-filled)"
    if kind == "idx pointers damaged":
        _zero(idx, 34 + 4 * 30 + 8 * 3, 8)  # the 4th sequence pointer
        return f"{idx}: sequence lengths and pointers disagree"
    if kind == "bin cut":
        _cut(bin_, 2)
        return f"{bin_} has {size - 2} bytes but its index points to {size}; the .bin is truncated"
    if kind == "bin zero-filled":
        _zero(bin_, 0, size)
        return f"{bin_} has 4096 zero bytes at offset 0 (zero-filled"
    if kind == "bin with a zero hole":
        _zero(bin_, 8192, 4096)
        return f"{bin_} has 4096 zero bytes at offset 8192"
    if kind == "idx and bin swapped":
        os.rename(idx, f"{prefix}.tmp")
        os.rename(bin_, idx)
        os.rename(f"{prefix}.tmp", bin_)
        return f"{idx} is not an index file: it starts with b'"
    if kind == "bin is the index":
        shutil.copy(idx, bin_)
        return f"{bin_} is an index file, not token data: .idx and .bin swapped?"
    if kind == "bin of another dataset":
        shutil.copy(f"{other}.bin", bin_)
        return f"{bin_} has {os.path.getsize(bin_)} bytes but its index points to {size}"
    raise AssertionError(kind)


KINDS = ("idx cut by one byte", "idx shorter than its header", "idx zero-filled",
         "idx pointers damaged", "bin cut", "bin zero-filled", "bin with a zero hole",
         "idx and bin swapped", "bin is the index", "bin of another dataset")


def test_sound_datasets_pass(pair) -> None:
    assert [indexed_dataset_problem(p) for p in pair] == [None, None]
    assert os.path.getsize(f"{pair[0]}.bin") > 3 * 4096  # the hole test needs blocks


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ("training blend, 2nd prefix", "validation blend, 1st prefix"))
def test_each_damage_is_one_line_naming_the_file(pair, kind, where) -> None:
    web, books = pair
    damaged = books if where.startswith("training") else web
    expected = _damage(kind, damaged, other=web if damaged == books else books)
    training = ([web, books], [0.5, 0.5]) if where.startswith("training") else ([books], None)
    validation = ([web, books], [0.5, 0.5]) if where.startswith("validation") else None
    with pytest.raises(ConfigError) as caught:
        check_sources(training, validation, None if validation else "90,10,0")
    line = str(caught.value)
    key = "data.path" if where.startswith("training") else "data.valid_path"
    assert line.startswith(f"{key}={damaged}: ") and expected in line and "\n" not in line


@pytest.mark.e2e
def test_a_truncated_idx_in_a_blend_stops_the_run_before_step_1(pair, tmp_path) -> None:
    web, books = pair
    _cut(f"{books}.idx", 8)
    proc = run_script("launch/pretrain_grove.py", "--config", str(TINY), *FAST,
                      "parallel.expert_model_parallel_size=1",
                      f"data.path=[[0.7,{web}],[0.3,{books}]]", f"logging.dir={tmp_path / 'log'}",
                      timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    ours = [line for line in proc.stderr.splitlines() if line.startswith("pretrain_grove.py")]
    assert "Traceback" not in proc.stderr and ours == [
        f"pretrain_grove.py: config error: data.path={books}: {books}.idx is truncated: "
        f"{os.path.getsize(f'{books}.idx')} bytes, its header (31 sequences, 32 documents) says "
        f"{os.path.getsize(f'{books}.idx') + 8}; preprocess it again"]
    assert not (tmp_path / "log").exists()  # nothing written
