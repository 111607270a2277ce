"""Per-step metrics: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars.

Only the first global rank writes, appending each record as it comes (nothing is kept in
memory). Every line is strict JSON: a non-finite number (a skipped step's loss) is written as
``null``. A resumed run keeps the records up to the step it resumed from and cuts the file
after them (records of steps it will redo, and a last line torn by a crash mid-write), reading
the file backwards from its end only as far as it cuts, so a restart costs no more than the
records it drops. A run that starts from scratch where a ``metrics.jsonl`` already holds
records first moves that file aside to ``metrics.jsonl.N`` (the first free N), so no earlier
run's records are lost.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["MetricsWriter", "read_metrics", "strict_json", "keep_records_through"]

_BLOCK = 1 << 16


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def strict_json(record: dict[str, Any]) -> str:
    """One line of strict JSON (non-finite numbers as null)."""
    return json.dumps(_finite(record), allow_nan=False)


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Flatten a record into TensorBoard tags: lists become ``tag/i``, dicts ``tag/key``."""
    out: dict[str, float] = {}
    for key, value in record.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, f"{tag}/"))
        elif isinstance(value, (list, tuple)):
            out.update(_scalars({str(i): v for i, v in enumerate(value)}, f"{tag}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            out[tag] = float(value)
    return out


def _rfind_newline(f: BinaryIO, before: int) -> int:
    """Offset of the last ``\\n`` before offset ``before`` (-1 if none)."""
    while before > 0:
        start = max(0, before - _BLOCK)
        f.seek(start)
        found = f.read(before - start).rfind(b"\n")
        if found >= 0:
            return start + found
        before = start
    return -1


def _step_of(line: bytes) -> int | None:
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) else None


def keep_records_through(path: str | Path, step: int) -> None:
    """Cut the JSONL file ``path`` right after its last complete record whose ``step`` is at
    most ``step`` (to nothing if there is none); a torn last line always goes. Reads backwards
    from the end, only as far as it cuts. Records must be in step order, as the writer keeps
    them."""
    with open(path, "r+b") as f:
        newline = _rfind_newline(f, f.seek(0, os.SEEK_END))  # bytes after it: a torn line
        keep = 0
        while newline >= 0:
            previous = _rfind_newline(f, newline)
            f.seek(previous + 1)
            line_step = _step_of(f.read(newline - previous - 1))
            if line_step is not None and line_step <= step:
                keep = newline + 1
                break
            newline = previous
        f.truncate(keep)


def _set_aside(path: Path) -> Path | None:
    """Rename a non-empty ``path`` to ``path.N`` (the first free N); the new name, or None."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    n = 1
    while path.with_name(f"{path.name}.{n}").exists():
        n += 1
    target = path.with_name(f"{path.name}.{n}")
    os.replace(path, target)
    return target


class MetricsWriter:
    """Writes step records. ``enabled=False`` (non-zero ranks) makes every call a no-op.
    ``resume_step``: the step the run resumes after (0: a fresh start). ``set_aside``: where
    an earlier run's file went on a fresh start (None if nowhere)."""

    def __init__(self, log_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        self.set_aside: Path | None = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step and self.path.is_file():
            keep_records_through(self.path, resume_step)
        elif not resume_step:
            self.set_aside = _set_aside(self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"),
                                     purge_step=resume_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        """Append one step record (must hold ``step``)."""
        if not self.enabled:
            return
        try:
            with open(self.path, "a") as f:
                f.write(strict_json(record) + "\n")
        except OSError as exc:  # e.g. a full disk: say which file
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        if self._tb is not None:
            for tag, value in _scalars(record).items():
                if math.isfinite(value):
                    self._tb.add_scalar(tag, value, record["step"])
            self._tb.flush()  # a run that stops on an error or a signal keeps its events too

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (empty list if the file does not exist); a last line
    without its newline (being written, or torn by a crash) is left out."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]
