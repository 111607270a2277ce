"""Reading and writing Hugging Face checkpoint folders: ``config.json`` + safetensors, single
file (``model.safetensors``) or sharded (``model-0000i-of-0000n.safetensors`` +
``model.safetensors.index.json``), and the tokenizer files beside them.

Reading is lazy (tensors come from memory-mapped files on demand) and checks the index
against the shard files (a shard that is missing or lacks a tensor the index names is a
*partial* checkpoint). Writing goes to a temporary folder renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from megatron_grove.data.tokenizer import copy_tokenizer_files
from megatron_grove.hf_conversion.hf_config import HFFormatError

__all__ = ["HFTensors", "read_hf_config", "is_hf_checkpoint", "write_hf_checkpoint"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def is_hf_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / INDEX_FILE).is_file() or (path / SINGLE_FILE).is_file())


def read_hf_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise HFFormatError(f"{path}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise HFFormatError(f"{file}: not valid JSON ({exc})") from None


def _open_shard(file: Path):
    """``safe_open`` a shard; a damaged or truncated one is a one-line HFFormatError."""
    try:
        return safe_open(str(file), framework="pt")
    except SafetensorError as exc:
        raise HFFormatError(f"{file}: damaged or truncated safetensors file ({exc})") from None


class HFTensors(Mapping[str, torch.Tensor]):
    """The tensors of a HF checkpoint folder as a read-only mapping (loaded on access).

    Use as a context manager (``with HFTensors(dir) as tensors: ...``) to close the files.
    ``shapes`` and :meth:`dtype_name` are known without reading any tensor data.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if (path / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise HFFormatError(f"{path / INDEX_FILE}: not a safetensors index ({exc})") from None
        elif (path / SINGLE_FILE).is_file():
            weight_map = None
        else:
            raise HFFormatError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} (not a Hugging Face "
                                "safetensors checkpoint)")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE_FILE]
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise HFFormatError(f"{path}: shard file(s) {', '.join(missing)} named in {INDEX_FILE} "
                                "are missing: the checkpoint is partial")
        self._stack = ExitStack()
        self._handles = {f: self._stack.enter_context(_open_shard(path / f)) for f in files}
        self._where: dict[str, str] = {}
        for f, handle in self._handles.items():
            for name in handle.keys():
                self._where[name] = f
        if weight_map:
            absent = [n for n, f in weight_map.items() if self._where.get(n) != f]
            if absent:
                raise HFFormatError(f"{path}: {len(absent)} tensor(s) named in {INDEX_FILE} are "
                                    f"not in their shard (first: {absent[0]}): the checkpoint is "
                                    "partial")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self._handles[f].get_slice(n).get_shape()) for n, f in self._where.items()}

    def part(self, name: str, index: tuple) -> torch.Tensor:
        """``self[name][index]`` (ints and slices), reading only that part of the file."""
        return self._handles[self._where[name]].get_slice(name)[index]

    def dtype_name(self, name: str) -> str:
        """safetensors dtype name of tensor ``name`` (e.g. ``'F32'``, ``'BF16'``)."""
        if name not in self._where:
            raise HFFormatError(f"tensor {name} is missing: the checkpoint is partial")
        return self._handles[self._where[name]].get_slice(name).get_dtype()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "HFTensors":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_hf_checkpoint(output: str | Path, config: dict[str, Any],
                        tensors: Mapping[str, torch.Tensor], max_shard_bytes: int = 5 * 2 ** 30,
                        tokenizer_dir: str | Path | None = None,
                        progress: Callable[[Iterator], Iterator] = iter,
                        extra_files: Mapping[str, str] | None = None) -> None:
    """Write ``config.json`` and the tensors (in order, shards of at most ``max_shard_bytes``;
    one shard -> ``model.safetensors``, else the sharded files + index), the tokenizer files
    of ``tokenizer_dir`` and ``extra_files`` (file name -> text, e.g. modelling code) into the
    new folder ``output``, atomically."""
    output = Path(output)
    tmp = output.parent / f".{output.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in progress(iter(tensors)):
        tensor = tensors[name].contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE_FILE), metadata=metadata)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / file), metadata=metadata)
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
        (tmp / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if tokenizer_dir is not None:
        copy_tokenizer_files(tokenizer_dir, tmp)
    if output.exists():
        output.rmdir()  # the caller checked it is empty
    os.replace(tmp, output)
