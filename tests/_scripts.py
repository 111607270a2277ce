"""Run one of the repository's scripts (``tools/``, ``benchmarks/``, ``launch/``) in a child
Python process, this checkout first on its ``PYTHONPATH``.

    proc = run_script("tools/evaluate.py", "--checkpoint", str(ckpt), "--json")
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, *args: str, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ROOT/script *args``; stdout and stderr captured as text; ``env`` adds to (or
    replaces entries of) this process's environment."""
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": pythonpath, **(env or {})})
