"""One run per checkpoint folder: a lock file naming the run that holds the folder.

Rank 0 of a run takes ``FOLDER/.run.lock`` in ``checkpoint.save`` and in ``logging.dir`` in
pre-flight, before anything is written there; it holds ``{"host", "pid", "pid_start",
"job_id", "started"}`` (``pid_start``: the process's start time in clock ticks, so a reused
pid is not mistaken for the holder; ``job_id``: ``SLURM_JOB_ID``). A thread refreshes the
file's modification time every ``stale_s / 10`` seconds (the heartbeat); the lock goes when
the process ends (:func:`megatron_grove.job_exit.exit_now`, ``atexit``).

A second run finds the lock and refuses with one line naming the holder
(:class:`RunLockHeld`, a ConfigError: exit 2), having written nothing. It takes the lock
over, saying so, when the holder is gone: on this host its pid is not alive (or is another
process), or, on any host, the heartbeat is older than ``stale_s``; or when the holder is the
same SLURM job (a requeue takes its own lock back). Taking a lock is ``O_CREAT | O_EXCL``
(atomic, also on NFS v3+ and Lustre); taking one over renames the stale file away first and
puts it back if what it moved turns out to be a fresh lock of a third run.
"""

from __future__ import annotations

import atexit
import datetime
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from megatron_grove.config import ConfigError
from megatron_grove.job_exit import at_exit

__all__ = ["LOCK_NAME", "RunLockHeld", "LockHolder", "RunLock", "take_run_lock"]

LOCK_NAME = ".run.lock"


class RunLockHeld(ConfigError):
    """Another live run holds the folder (one line naming it)."""


def _pid_start(pid: int) -> str | None:
    """The start time (clock ticks since boot) of process ``pid``, or None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock (the lock file's content)."""

    host: str
    pid: int
    pid_start: str | None
    job_id: str | None
    started: str

    @classmethod
    def this_process(cls) -> LockHolder:
        return cls(socket.gethostname(), os.getpid(), _pid_start(os.getpid()),
                   os.environ.get("SLURM_JOB_ID") or None,
                   datetime.datetime.now().astimezone().isoformat(timespec="seconds"))

    def describe(self) -> str:
        job = f", SLURM job {self.job_id}" if self.job_id else ""
        return f"the run of pid {self.pid} on {self.host}{job}, started {self.started}"

    def is_alive_here(self) -> bool:
        """False when it ran on this host and its process is gone (or its pid was reused)."""
        if self.host != socket.gethostname():
            return True
        start = _pid_start(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)


def _read(path: Path) -> tuple[LockHolder | None, float | None]:
    """The holder in ``path`` (None: unreadable or torn) and the file's age in seconds (None:
    no file)."""
    try:
        age = time.time() - path.stat().st_mtime
        data = json.loads(path.read_text())
        return LockHolder(**{k: data[k] for k in LockHolder.__dataclass_fields__}), age
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError):
        return None, age


def _takeover_reason(holder: LockHolder | None, age: float, me: LockHolder,
                     stale_s: float) -> str | None:
    """Why the lock of ``holder`` (``age`` s since its heartbeat) may be taken, or None."""
    if holder is None:
        return "an unreadable lock file, no heartbeat for a while" if age > stale_s else None
    if (holder.host, holder.pid) == (me.host, me.pid):
        return "this process"
    if holder.job_id and holder.job_id == me.job_id:
        return f"the same SLURM job {me.job_id}, requeued"
    if not holder.is_alive_here():
        return f"its process {holder.pid} is gone from {holder.host}"
    if age > stale_s:
        return f"no heartbeat for {age:.0f} s (checkpoint.lock_stale_s={stale_s:g})"
    return None


class RunLock:
    """A taken lock: its heartbeat thread runs until :meth:`release`."""

    def __init__(self, path: Path, holder: LockHolder, stale_s: float) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, args=(max(0.5, stale_s / 10),),
                                        name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        at_exit(self.release)
        atexit.register(self.release)

    def _ours(self) -> bool:
        return _read(self.path)[0] == self.holder

    def _beat(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            if not self._ours():
                return  # taken over: nothing of ours to refresh
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours."""
        self._stop.set()
        if self._ours():
            try:
                self.path.unlink()
            except OSError:
                pass


def _create(path: Path, holder: LockHolder) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(holder), f)
    return True


def take_run_lock(folder: str | Path, key: str, stale_s: float) -> tuple[RunLock, str | None]:
    """Take ``folder``'s run lock (``folder`` exists). Returns the lock and, when it took over
    a gone run's lock, the line saying so. Raises :class:`RunLockHeld` naming the holder."""
    path = Path(folder) / LOCK_NAME
    me = LockHolder.this_process()
    note = None
    for _ in range(20):
        if _create(path, me):
            return RunLock(path, me, stale_s), note
        holder, age = _read(path)
        if age is None:
            continue  # released meanwhile
        reason = _takeover_reason(holder, age, me, stale_s)
        if reason is None:
            if holder is None:  # being written by a run that just took it
                time.sleep(0.1)
                continue
            raise RunLockHeld(
                f"{key}={folder}: in use by {holder.describe()} (its lock {path}, heartbeat "
                f"{age:.0f} s ago); one run per folder: wait for it, stop it, or choose another "
                f"{key} (a lock whose run is gone is taken over, on another host after "
                f"checkpoint.lock_stale_s={stale_s:g} s without heartbeat)")
        aside = path.with_name(f"{LOCK_NAME}.stale-{me.host}-{me.pid}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue  # another run took it over first
        if _read(aside)[0] != holder:  # we moved a third run's fresh lock: put it back
            try:
                os.link(aside, path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        if reason != "this process":
            who = holder.describe() if holder else "an unknown run"
            note = f"{key}={folder}: took over the lock of {who}: {reason}"
    raise RunLockHeld(f"{key}={folder}: cannot take its lock {path} (other runs keep taking "
                      "it); start one run per folder")
