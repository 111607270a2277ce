"""Checkpoint integrity: a manifest of every file a save wrote (size and CRC-32s), checked on load.

A save writes ``manifest.json`` into the checkpoint's temporary folder after every rank has
written its files and before the folder is renamed into place, so a published checkpoint
always carries the manifest of exactly what it holds::

    {"format": "megatron_grove.manifest/1", "algorithm": "crc32", "piece_bytes": 67108864,
     "files": {"__0_0.distcp": {"size": 8371802, "crc32": ["9f1c2ab0"]}, ...}}

(paths relative to the checkpoint folder; ``manifest.json`` itself is not listed; one CRC-32
per piece of ``piece_bytes`` of a file, so that large files are hashed in parallel).
Hashing and checking are collective and parallel: the pieces are split over the ranks by size
(largest first, each to the least loaded rank), every rank reads and hashes its share in a few
threads (``zlib.crc32`` releases the GIL), and the results meet on every rank. Each rank thus
reads about ``1 / world size`` of the checkpoint once more; right after a save the files are
usually still in the page cache.

An asynchronous save's background writer hashes the files it has just written itself
(:func:`record_written_files`, into ``.hashed/rank_N.json`` of the temporary folder), while
training goes on; :func:`write_manifest` then reads only the files no writer recorded (or whose
size changed since) and removes ``.hashed/``: the same CRC-32s of the same bytes, computed off
the training's path.

CRC-32 detects accidental damage (flipped, zeroed or random bytes, truncation); it is not a
defence against deliberate tampering.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from megatron_grove.runtime.distributed import object_from_rank0, objects_from_all_ranks

__all__ = ["MANIFEST_NAME", "MANIFEST_FORMAT", "FileProblem", "record_written_files",
           "write_manifest", "verify_manifest"]

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "megatron_grove.manifest/1"
PIECE_BYTES = 64 << 20  # one CRC-32 per piece of a file: the unit of parallel hashing
_THREADS = 4  # pieces hashed at once per rank
HASHED_DIR = ".hashed"  # per-rank records of files hashed by their writer, until the manifest


@dataclass(frozen=True)
class FileProblem:
    """One file of a checkpoint that does not match its manifest."""

    name: str  # path relative to the checkpoint folder
    what: str  # e.g. "missing", "truncated: 100 bytes, the manifest says 4096"

    def __str__(self) -> str:
        return f"{self.name}: {self.what}"


Piece = tuple[str, int]  # (file, piece index)


def _crc32(path: Path, piece: int, piece_bytes: int) -> str:
    """CRC-32 of piece ``piece`` of the file at ``path`` (fewer bytes at its end), read through
    a memory map: no buffer is allocated (buffers allocated in short-lived threads stay with
    the allocator's per-thread arenas and made the process grow by one buffer per save)."""
    with open(path, "rb") as f:
        start = piece * piece_bytes
        length = min(piece_bytes, os.fstat(f.fileno()).st_size - start)
        if length <= 0:
            return f"{0:08x}"
        with mmap.mmap(f.fileno(), length, offset=start, access=mmap.ACCESS_READ) as data:
            return f"{zlib.crc32(data):08x}"


def _rank_and_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _piece_count(size: int, piece_bytes: int) -> int:
    """Pieces of a file of ``size`` bytes (an empty file is one empty piece)."""
    return max(1, -(-size // piece_bytes))


def _pieces(sizes: dict[str, int], piece_bytes: int) -> dict[Piece, int]:
    """Every piece of every file with its length (an empty file is one empty piece)."""
    return {(name, i): min(piece_bytes, size - i * piece_bytes)
            for name, size in sizes.items()
            for i in range(_piece_count(size, piece_bytes))}


def _share(lengths: dict[Piece, int], rank: int, world: int) -> list[Piece]:
    """The pieces ``rank`` hashes: largest first, each to the least loaded rank (ties: lowest
    rank); the same split on every rank."""
    load = [0] * world
    mine = []
    for piece in sorted(lengths, key=lambda p: (-lengths[p], p)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += lengths[piece]
        if owner == rank:
            mine.append(piece)
    return mine


def _in_threads(fn, items: list) -> list:
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=min(_THREADS, len(items))) as pool:
        return list(pool.map(fn, items))


def record_written_files(folder: str | Path, paths: list[str | Path], rank: int) -> None:
    """Hash the files ``paths`` that this rank has just written under ``folder`` and record
    their sizes and CRC-32s in ``folder/.hashed/rank_<rank>.json`` (written atomically), for
    :func:`write_manifest`. Not collective: an asynchronous save's writer process calls it."""
    folder = Path(folder)
    records = {}
    for path in map(Path, paths):
        size = path.stat().st_size
        records[str(path.relative_to(folder))] = {"size": size, "crc32": _in_threads(
            lambda piece, path=path: _crc32(path, piece, PIECE_BYTES),
            list(range(_piece_count(size, PIECE_BYTES))))}
    (folder / HASHED_DIR).mkdir(exist_ok=True)
    tmp = folder / HASHED_DIR / f".rank_{rank:05d}.json.tmp"
    tmp.write_text(json.dumps(records))
    os.replace(tmp, folder / HASHED_DIR / f"rank_{rank:05d}.json")


def _recorded_crcs(folder: Path, sizes: dict[str, int]) -> dict[str, list[str]]:
    """The writers' records (:func:`record_written_files`) of files still of the recorded size."""
    known = {}
    for record in sorted((folder / HASHED_DIR).glob("rank_*.json")):
        for name, entry in json.loads(record.read_text()).items():
            if sizes.get(name) == entry["size"] and len(entry["crc32"]) == _piece_count(
                    entry["size"], PIECE_BYTES):
                known[name] = entry["crc32"]
    return known


def write_manifest(folder: str | Path) -> dict[str, Any]:
    """Collective: hash every file under ``folder`` (split over the ranks; files a writer
    recorded are not read again) and have rank 0 write ``folder/manifest.json``. Call after
    every rank has finished writing. Returns the manifest."""
    folder = Path(folder)
    rank, world = _rank_and_world()
    listing = None
    if rank == 0:
        sizes = {str(p.relative_to(folder)): p.stat().st_size
                 for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MANIFEST_NAME
                 and HASHED_DIR not in p.relative_to(folder).parts}
        listing = (sizes, _recorded_crcs(folder, sizes))
    sizes, known = object_from_rank0(listing)
    unknown = {name: size for name, size in sizes.items() if name not in known}
    mine = _share(_pieces(unknown, PIECE_BYTES), rank, world)
    local = dict(zip(mine, _in_threads(lambda p: _crc32(folder / p[0], p[1], PIECE_BYTES), mine)))
    crcs: dict[Piece, str] = {(name, i): crc for name, pieces in known.items()
                              for i, crc in enumerate(pieces)}
    for part in objects_from_all_ranks(local):
        crcs.update(part)
    files = {name: {"size": size, "crc32": [crcs[(name, i)]
                                            for i in range(_piece_count(size, PIECE_BYTES))]}
             for name, size in sizes.items()}
    manifest = {"format": MANIFEST_FORMAT, "algorithm": "crc32", "piece_bytes": PIECE_BYTES,
                "files": files}
    if rank == 0:
        tmp = folder / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, folder / MANIFEST_NAME)
        shutil.rmtree(folder / HASHED_DIR, ignore_errors=True)
    return manifest


def _read_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None), or (None, why it cannot be used)."""
    try:
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            return None, f"not a {MANIFEST_FORMAT} manifest"
        piece_bytes = int(manifest["piece_bytes"])
        for entry in manifest["files"].values():
            if len(entry["crc32"]) != _piece_count(int(entry["size"]), piece_bytes):
                return None, "inconsistent (a file's pieces do not match its size)"
        return manifest, None
    except FileNotFoundError:
        return None, "missing"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"unreadable ({type(exc).__name__}: {exc})"


def _size_problem(folder: Path, name: str, expected: int) -> FileProblem | None:
    try:
        size = (folder / name).stat().st_size
    except FileNotFoundError:
        return FileProblem(name, "missing")
    if size != expected:
        what = "truncated" if size < expected else "longer than written"
        return FileProblem(name, f"{what}: {size} bytes, the manifest says {expected}")
    return None


def verify_manifest(folder: str | Path) -> list[FileProblem]:
    """Collective: check every file of ``folder``'s manifest (size, then the CRC-32 of each
    piece), each rank its share. Returns the problems found, at most one per file (the same
    sorted list on every rank); a missing or unreadable manifest is one problem."""
    folder = Path(folder)
    rank, world = _rank_and_world()
    manifest, why = object_from_rank0(_read_manifest(folder) if rank == 0 else None)
    if manifest is None:
        return [FileProblem(MANIFEST_NAME, why)]
    files, piece_bytes = manifest["files"], int(manifest["piece_bytes"])
    mine = _share(_pieces({n: int(e["size"]) for n, e in files.items()}, piece_bytes), rank, world)

    def check(piece: Piece) -> FileProblem | None:
        name, index = piece
        problem = _size_problem(folder, name, int(files[name]["size"]))
        if problem is not None:  # reported once, by the owner of the file's first piece
            return problem if index == 0 else None
        if _crc32(folder / name, index, piece_bytes) != files[name]["crc32"][index]:
            return FileProblem(name, "checksum mismatch: its bytes changed after the save")
        return None

    local = [p for p in _in_threads(check, mine) if p is not None]
    first: dict[str, FileProblem] = {}
    for problem in sorted((p for part in objects_from_all_ranks(local) for p in part),
                          key=lambda p: (p.name, p.what)):
        first.setdefault(problem.name, problem)
    return list(first.values())
