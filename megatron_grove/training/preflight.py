"""Pre-flight checks: what a run needs from the machine, checked before anything is built.

Run on every rank right after the process group starts (:func:`preflight`, collective): a run
that cannot write its checkpoints or metrics, whose data files are missing or inconsistent,
or whose tokenizer cannot be read stops within seconds, before step 1, with one line naming
the key (:class:`PreflightError`, a :class:`~megatron_grove.config.ConfigError`: exit code 2),
instead of at the first save hours later. Then rank 0 takes the run locks of
``checkpoint.save`` and ``logging.dir`` (one run per folder:
:mod:`megatron_grove.checkpointing.run_lock`). The device is checked earlier, when it is chosen
(:func:`megatron_grove.runtime.resolve_device`).
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

from megatron_grove.checkpointing.run_lock import RunLock, RunLockHeld, take_run_lock
from megatron_grove.config import ConfigError, GroveConfig
from megatron_grove.data.blends import megatron_blend
from megatron_grove.data.integrity import indexed_dataset_problem
from megatron_grove.runtime.distributed import objects_from_all_ranks

__all__ = ["PreflightError", "preflight", "writable_dir_problem", "dataset_problem"]


class PreflightError(ConfigError):
    """Something the run needs is missing or unusable (one line, names the key)."""


def writable_dir_problem(key: str, path: str | Path, rank: int) -> str | None:
    """Create ``path`` (with parents) and write and remove a probe file there; the problem in
    one line, or None."""
    path = Path(path)
    probe = path / f".write-test-{socket.gethostname()}-{os.getpid()}-rank{rank}"  # unique
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return f"{key}={path}: cannot write there ({exc.strerror or exc}); choose a writable folder"
    return None


def dataset_problem(prefix: str, key: str = "data.path") -> str | None:
    """``KEY=PREFIX: what is wrong`` with the indexed dataset ``prefix``
    (:func:`~megatron_grove.data.integrity.indexed_dataset_problem`), or None."""
    problem = indexed_dataset_problem(prefix)
    return f"{key}={prefix}: {problem}" if problem else None


def _tokenizer_problem(name: str | None) -> str | None:
    from megatron_grove.data.tokenizer import load_tokenizer

    try:
        load_tokenizer(name)
    except Exception as exc:  # missing file, bad JSON, no end-of-document token, ...
        return f"data.tokenizer={name}: cannot load a tokenizer ({type(exc).__name__}: {exc})"
    return None


def _local_problem(cfg: GroveConfig, rank: int) -> str | None:
    """The first problem this rank sees, or None."""
    if cfg.checkpoint.save and (p := writable_dir_problem("checkpoint.save",
                                                          cfg.checkpoint.save, rank)):
        return p
    if rank == 0 and (p := writable_dir_problem("logging.dir", cfg.logging.dir, rank)):
        return p  # only rank 0 writes metrics
    for key, source in (("data.path", cfg.data.path), ("data.valid_path", cfg.data.valid_path)):
        for prefix in megatron_blend(source)[0] if source else []:
            if p := dataset_problem(prefix, key):
                return p
    return _tokenizer_problem(cfg.data.tokenizer)


def _take_run_locks(cfg: GroveConfig) -> tuple[list[RunLock], list[str], str | None]:
    """Rank 0: the run locks of ``checkpoint.save`` and ``logging.dir``
    (:mod:`~megatron_grove.checkpointing.run_lock`), the take-over lines, the problem."""
    locks, notes = [], []
    folders = {"checkpoint.save": cfg.checkpoint.save, "logging.dir": cfg.logging.dir}
    taken: set[Path] = set()
    for key, folder in folders.items():
        if not folder or Path(folder).resolve() in taken:
            continue
        taken.add(Path(folder).resolve())
        try:
            lock, note = take_run_lock(folder, key, cfg.checkpoint.lock_stale_s)
        except RunLockHeld as exc:
            for lock in locks:
                lock.release()
            return [], notes, str(exc)
        locks.append(lock)
        notes += [note] if note else []
    return locks, notes, None


def preflight(cfg: GroveConfig, rank: int) -> None:
    """Collective: raise :class:`PreflightError` on every rank when any rank found a problem
    (the lowest rank's; prefixed with that rank unless it is rank 0). Rank 0 then takes the
    run locks (held until the process ends) and prints the lines of locks it took over."""
    problem = _local_problem(cfg, rank)
    locks, notes = [], []
    if problem is None and rank == 0:
        locks, notes, problem = _take_run_locks(cfg)
    failed = [(r, p) for r, p in enumerate(objects_from_all_ranks(problem)) if p]
    if failed:
        for lock in locks:
            lock.release()
        first_rank, problem = failed[0]
        raise PreflightError(problem if first_rank == 0 else f"rank {first_rank}: {problem}")
    for note in notes:
        print(note, file=sys.stderr, flush=True)
