"""Per-step metrics: one JSON object per line in ``metrics.jsonl`` plus TensorBoard scalars.

Only the first global rank writes. A resumed run appends to the same file, first dropping
records of steps that the checkpoint it resumed from had not reached (they will be redone),
so the file always holds one record per step.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsWriter", "read_metrics"]


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


class MetricsWriter:
    """Writes step records. ``enabled=False`` (non-zero ranks) makes every call a no-op."""

    def __init__(self, log_dir: str | Path, enabled: bool, tensorboard: bool = True,
                 resume_step: int = 0) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        tmp = self.path.with_name(f".{self.path.name}.tmp")  # a crash keeps the old records
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(tmp, self.path)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        """Append one step record (must hold ``step``)."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for tag, value in _scalars(record).items():
                if math.isfinite(value):
                    self._tb.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (empty list if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
