"""Carving speed of this checkout against another (e.g. the previous commit), side by side.

    git archive HEAD~1 | tar -x -C /tmp/base
    python benchmarks/carving_speed.py --baseline /tmp/base --rounds 2

Runs ``tools/carve_cmoe.py`` (S3A3E8 of SmolLM2-135M from its ``.gguf`` by default) from each
checkout in turn, ``--rounds`` times (alternating, so that both see the same machine load),
prints the phases of each run from its ``carve.json`` with the load average, the ratios of the
median construction times (read + calibration + clustering; wall and process CPU), and whether
both checkouts wrote the same tensors (the HF-style export, bitwise: the same carved model,
the same perplexity).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from megatron_grove.hf_conversion.gguf import smollm2_gguf_path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("read_s", "calibration_s", "clustering_s", "construction_s", "writing_s",
          "construction_cpu_s")


def carve(checkout: Path, model: str, spec: list[str], output: Path) -> dict:
    """One carving by ``checkout``'s tool in its own process; its ``carve.json``."""
    env = dict(os.environ, PYTHONPATH=str(checkout))
    subprocess.run([sys.executable, str(checkout / "tools" / "carve_cmoe.py"), "--model", model,
                    *spec, "--output", str(output), "--no-progress"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((output / "carve.json").read_text())


def same_tensors(a: Path, b: Path) -> bool:
    """Whether carvings ``a`` and ``b`` exported bitwise the same tensors."""
    ta, tb = (load_file(str(folder / "hf" / "model.safetensors")) for folder in (a, b))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def main() -> int:
    parser = argparse.ArgumentParser(prog="carving_speed.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, help="the other checkout (a folder)")
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct .gguf")
    parser.add_argument("--spec", nargs=3, type=int, default=(3, 3, 8), metavar=("S", "A", "N"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    model = args.model or str(smollm2_gguf_path())
    spec = ["--shared", str(args.spec[0]), "--active", str(args.spec[1]),
            "--experts", str(args.spec[2])]
    checkouts = {"baseline": Path(args.baseline).resolve(), "this": ROOT}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, checkout in checkouts.items():
                record = carve(checkout, model, spec, Path(tmp) / f"{name}{r}")
                runs[name].append(record)
                phases = "  ".join(f"{p} {record[p]:6.2f}" for p in PHASES)
                print(f"{name:8s} round {r}: {phases}  load {record['load_average_1min']}",
                      flush=True)
        same = same_tensors(Path(tmp) / "baseline0", Path(tmp) / "this0")
    for key in ("construction_s", "construction_cpu_s"):
        base, this = (statistics.median(x[key] for x in runs[n]) for n in checkouts)
        print(f"median {key}: baseline {base:.2f}, this {this:.2f}, "
              f"ratio this/baseline {this / base:.2f}")
    print(f"same carved tensors: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
