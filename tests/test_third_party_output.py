"""Third-party banners are filtered (megatron_grove/third_party_output.py), real warnings are not,
and MEGATRON_GROVE_VERBOSE=1 shows the banners again (so the filters match upstream's text)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# imports Megatron the way every run does (after megatron_grove), then warns and logs as
# Megatron would: two banners and two real problems
SCRIPT = """
import logging, warnings
import megatron_grove
import megatron.core.optimizer, megatron.core.models.gpt
logging.basicConfig()
gpt = logging.getLogger("megatron.core.models.gpt.gpt_model")
gpt.warning("GPTModel IS DEPRECATED. GPTModel is only accepting critical bug fixes")
gpt.warning("a real problem logged by Megatron")
warnings.warn_explicit("a real problem warned by Megatron", UserWarning, "torch.py", 1,
                       module="megatron.core.dist_checkpointing.strategies.torch")
warnings.warn("Transformer Engine and Apex are not installed. Falling back, in user code")
"""


def _stderr(verbose: bool) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("MEGATRON_GROVE_VERBOSE", None)
    if verbose:
        env["MEGATRON_GROVE_VERBOSE"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_banners_are_filtered_and_real_warnings_come_through():
    quiet, verbose = _stderr(verbose=False), _stderr(verbose=True)
    for banner in ("Transformer Engine and Apex are not installed. Falling back to Torch",
                   "Apex is not installed. Falling back to Torch Norm", "GPTModel IS DEPRECATED"):
        assert banner in verbose  # Megatron prints it (the filter is not matching nothing)
        assert banner not in quiet
    for real in ("a real problem logged by Megatron", "a real problem warned by Megatron",
                 "Falling back, in user code"):  # a banner's words outside Megatron still warn
        assert real in quiet and real in verbose
