"""The GPU check: the GPU tests, the kernel benchmark at the 33B shapes, a short bf16 training
run with Triton kernels, the training-step benchmark on one GPU and TransformerEngine/FP8 when
TE imports, each with its own time limit (8 minutes together), into one JSON of figures.

Run it through scripts/gpu_check.sh, which first installs the wheels in .whl/ (the project's
dependencies the GPU image lacks) and puts them on PYTHONPATH:

    bash scripts/gpu_check.sh --out $OUT/gpu_check.json     # on the GPU machine
    PYTHON=.venv/bin/python bash scripts/gpu_check.sh --plan  # anywhere: check, run nothing

--plan checks what a machine without a GPU can: the wheels (tags, one version each, <= 60 MB),
that megatron.core imports from them, every step's scripts and configs, that pytest collects
the GPU tests, the time budget. exit codes: 0 every step ok (or planned / skipped), 1 a step
failed or a check found a problem (the JSON says which), 2 bad arguments
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpu_check_steps import ROOT, check_passed, run_gpu_check


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_check.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true",
                        help="check the wheels, imports, scripts, configs and budget; run no step")
    parser.add_argument("--out", default="gpu_check.json",
                        help="the JSON of figures, rewritten after every step "
                             "(default gpu_check.json)")
    parser.add_argument("--site", default=None,
                        help="where scripts/gpu_check.sh installed the wheels")
    parser.add_argument("--wheels", default=str(ROOT / ".whl"),
                        help="the folder of wheels to check (default .whl/ of this checkout)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    if not out.parent.is_dir():
        print(f"gpu_check.py: error: --out {out}: no folder {out.parent}", file=sys.stderr)
        return 2
    report = run_gpu_check(args.plan, out, Path(args.site) if args.site else None,
                           Path(args.wheels))
    for name, step in report["steps"].items():
        detail = step.get("problems") or step.get("reason") or step.get("figures", "")
        print(f"{name:<22} {step['status']:<8} {json.dumps(detail)[:150]}")
    for problem in report.get("problems", []) + report["wheels"]["problems"]:
        print(f"problem: {problem}")
    print(f"wrote {out}")
    return 0 if check_passed(report) else 1


if __name__ == "__main__":
    sys.exit(main())
