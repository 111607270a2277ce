"""Checkpoint integrity: a manifest of every file a save wrote (size and CRC-32), checked on load.

A save writes ``manifest.json`` into the checkpoint's temporary folder after every rank has
written its files and before the folder is renamed into place, so a published checkpoint
always carries the manifest of exactly what it holds::

    {"format": "megatron_grove.manifest/1", "algorithm": "crc32",
     "files": {"__0_0.distcp": {"size": 8371802, "crc32": "9f1c2ab0"}, ...}}

(paths relative to the checkpoint folder; ``manifest.json`` itself is not listed). Hashing and
checking are collective and parallel: the files are split over the ranks by size (largest
first, each to the least loaded rank), every rank reads and hashes its share, in a few
threads, and the results meet on every rank, so each rank reads about ``1 / world size`` of
the checkpoint once more. Loading reads at least that share anyway (replicated tensors are
read by every rank), so checking costs less than the load itself; right after a save the
files are usually still in the page cache.

CRC-32 detects accidental damage (flipped, zeroed or random bytes, truncation); it is not a
defence against deliberate tampering.
"""

from __future__ import annotations

import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_grove.runtime.distributed import object_from_rank0, objects_from_all_ranks

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "FileProblem", "write_manifest",
           "verify_manifest", "has_manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "megatron_grove.manifest/1"
_CHUNK = 8 << 20  # bytes read at a time
_THREADS = 4  # files hashed at once per rank (zlib.crc32 releases the GIL)


@dataclass(frozen=True)
class FileProblem:
    """One file of a checkpoint that does not match its manifest."""

    name: str  # path relative to the checkpoint folder
    what: str  # e.g. "missing", "size 100 bytes, manifest says 4096", "checksum mismatch"

    def __str__(self) -> str:
        return f"{self.name}: {self.what}"


def _crc32(path: Path) -> str:
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(sizes: dict[str, int], rank: int, world: int) -> list[str]:
    """The files ``rank`` hashes: largest first, each to the least loaded rank (ties: lowest
    rank), the same split on every rank."""
    load = [0] * world
    mine = []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def _hash_share(folder: Path, names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(names))) as pool:
        return dict(zip(names, pool.map(lambda n: _crc32(folder / n), names)))


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Collective: hash every file under ``folder`` (split over the ranks) and have rank 0 write
    ``folder/manifest.json``. Call after every rank has finished writing. Returns the manifest."""
    folder = Path(folder)
    rank, world = _rank_and_world()
    sizes = None
    if rank == 0:
        sizes = {str(p.relative_to(folder)): p.stat().st_size
                 for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    sizes = object_from_rank0(sizes)
    crcs: dict[str, str] = {}
    for part in objects_from_all_ranks(_hash_share(folder, _share(sizes, rank, world))):
        crcs.update(part)
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "crc32",
                "files": {name: {"size": sizes[name], "crc32": crcs[name]} for name in sizes}}
    if rank == 0:
        tmp = folder / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / MANIFEST_NAME)
    return manifest


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def _read_manifest(folder: Path) -> tuple[dict[str, dict[str, Any]] | None, str | None]:
    """(files, None), or (None, why the manifest cannot be used)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            return None, f"not a {MANIFEST_FORMAT} manifest"
        for entry in files.values():
            int(entry["size"]), str(entry["crc32"])
        return files, None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def _check(folder: Path, name: str, entry: dict[str, Any]) -> FileProblem | None:
    path = folder / name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return FileProblem(name, "missing")
    if size != entry["size"]:
        what = "truncated" if size < entry["size"] else "longer than written"
        return FileProblem(name, f"{what}: {size} bytes, the manifest says {entry['size']}")
    if _crc32(path) != entry["crc32"]:
        return FileProblem(name, "checksum mismatch: its bytes changed after the save")
    return None


def verify_manifest(folder: str | Path) -> list[FileProblem]:
    """Collective: check every file of ``folder``'s manifest (size, then CRC-32), each rank its
    share. Returns the problems found (the same sorted list on every rank); a missing or
    unreadable manifest is one problem."""
    folder = Path(folder)
    rank, world = _rank_and_world()
    files, why = object_from_rank0(_read_manifest(folder) if rank == 0 else None)
    if files is None:
        return [FileProblem(MANIFEST_NAME, why)]
    names = _share({name: int(entry["size"]) for name, entry in files.items()}, rank, world)

    def check(name: str) -> FileProblem | None:
        return _check(folder, name, files[name])

    local: list[FileProblem] = []
    if names:
        with ThreadPoolExecutor(max_workers=min(_THREADS, len(names))) as pool:
            local = [p for p in pool.map(check, names) if p is not None]
    problems = [p for part in objects_from_all_ranks(local) for p in part]
    return sorted(problems, key=lambda p: p.name)
