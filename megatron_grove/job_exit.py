"""How a training process ends and tells the launcher why.

Workers end through :func:`exit_now` (``os._exit`` after the cleanups registered with
:func:`at_exit`, e.g. releasing the run lock): it skips the interpreter's teardown of torch
and Megatron, which a dead peer can block. Under :mod:`megatron_grove.launch` (which sets
``MEGATRON_GROVE_EXIT_DIR``) a worker that exits non-zero first writes ``rank{R}.json``
there: ``{"rank", "code", "time"}`` (a worker whose launcher died, e.g. SIGKILLed, removes
the folder instead: nobody would read or remove it). The launcher reads these to exit with the job's own code,
also after a signal to the launcher, when torchrun's agent keeps no worker exit codes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["EXIT_DIR_ENV", "LAUNCHER_PID_ENV", "WorkerExit", "at_exit", "exit_now", "read_exits"]

EXIT_DIR_ENV = "MEGATRON_GROVE_EXIT_DIR"
LAUNCHER_PID_ENV = "MEGATRON_GROVE_LAUNCHER_PID"
_cleanups: list[Callable[[], None]] = []


@dataclass(frozen=True)
class WorkerExit:
    """One worker's non-zero exit: global rank, exit code, wall time (seconds since epoch)."""

    rank: int
    code: int
    time: float


def at_exit(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup()`` in :func:`exit_now` (errors in it are ignored)."""
    _cleanups.append(cleanup)


def exit_now(code: int) -> None:
    """Run the cleanups, record a non-zero ``code`` for the launcher, flush, ``os._exit``."""
    for cleanup in reversed(_cleanups):
        try:
            cleanup()
        except Exception:
            pass
    folder = os.environ.get(EXIT_DIR_ENV)
    if folder and os.environ.get(LAUNCHER_PID_ENV) != str(os.getppid()):
        shutil.rmtree(folder, ignore_errors=True)  # the launcher died: nobody reads it, or
        # removes it
    elif folder and code != 0:
        rank = int(os.environ.get("RANK", "0"))
        try:
            tmp = Path(folder) / f".rank{rank}.json.tmp"
            tmp.write_text(json.dumps({"rank": rank, "code": code, "time": time.time()}))
            tmp.replace(Path(folder) / f"rank{rank}.json")
        except OSError:
            pass  # the launcher is gone: nobody to tell
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def read_exits(folder: str | Path) -> list[WorkerExit]:
    """The workers' recorded exits in ``folder``, earliest first."""
    exits = []
    for path in Path(folder).glob("rank*.json"):
        try:
            data = json.loads(path.read_text())
            exits.append(WorkerExit(int(data["rank"]), int(data["code"]), float(data["time"])))
        except (OSError, ValueError, KeyError):
            continue
    return sorted(exits, key=lambda e: e.time)
