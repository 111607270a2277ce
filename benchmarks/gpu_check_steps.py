"""The GPU check: everything that needs a GPU, as one prepared run that fits the few minutes a
single-GPU machine is lent (``scripts/gpu_check.sh`` installs the wheels it needs, then calls
``benchmarks/gpu_check.py``, the thin command line over :func:`run_gpu_check`).

Each step is a child process with its own time limit (together at most :data:`BUDGET_S`); a
step that fails or runs out of time is recorded as such and the next one runs. The figures go
into one JSON object::

    {"mode": "gpu" | "plan", "environment": {python, torch, triton, gpu, transformer_engine},
     "wheels": {...}, "budget_s": ..., "steps": {name: {"status": "ok" | "failed" | "timeout" |
     "skipped" | "planned", "seconds": ..., "command": [...], "figures": {...}, "tail": "..."}}}

Steps: ``gpu_tests`` (``pytest -m gpu``: compiled Triton kernels against their references in
value and gradient, the group-aware Grove layer on CUDA against the plain-torch reference);
``kernel_errors`` / ``layer_errors`` (the same checks' error figures, ``tests/gpu_checks.py``);
``kernels_benchmark`` (``benchmarks/kernels.py`` at the 33B shapes, 8192 tokens, EP=8);
``train_bf16_triton`` (a short bf16 run of the tiny model with ``kernels.backend=triton``:
losses, step time, tokens/s); ``train_step_benchmark`` (``benchmarks/train_step.py`` on the
33B-shaped tiny MoE, one GPU, EP=1); ``train_te_fp8`` (the same short run on TransformerEngine
with FP8, when ``transformer_engine.pytorch`` imports; skipped, saying so, otherwise);
``train_te_cp2`` (the same short run with context parallelism over 2 GPUs, TE attention; skipped,
saying so, without TE or with one GPU).

``plan`` mode (any machine, no GPU needed) checks what it can: the wheels (tags, one version
each, total size), that ``megatron.core`` imports from them, that every step's script and
config exist and the configs load, that pytest collects the GPU tests, and the time budget; it
runs nothing on a GPU.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["BUDGET_S", "WHEELS_LIMIT_BYTES", "Step", "gpu_steps", "check_wheels",
           "run_gpu_check", "check_passed"]

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480  # the steps' time limits together: 8 minutes
WHEELS_LIMIT_BYTES = 60 * 10**6
# what the GPU image (CUDA, PyTorch, Triton, numpy, pyyaml, tqdm, tensorboard, tokenizers,
# safetensors, transformers, pytest) lacks of our dependencies
REQUIRED_WHEELS = ("megatron-core",)

TINY = "configs/tiny_cpu.yaml"
TINY_33B_MOE = "configs/tiny_cpu_33b_moe.yaml"
RECIPE = "configs/grovemoe_33b_a3b.yaml"
# the short GPU training run (one process, EP=1): the tiny model on CUDA in bf16
TRAIN_OVERRIDES = ["runtime.device=cuda", "runtime.dtype=bf16",
                   "parallel.expert_model_parallel_size=1", "train.iters=30",
                   "train.lr_warmup_iters=3", "logging.progress_bar=false",
                   "logging.tensorboard=false"]


@dataclass
class Step:
    """One child process of the check: ``command`` (paths relative to the repository root;
    ``{work}`` is replaced by the step's scratch folder), its time limit, what reads its
    figures (from the completed process and the scratch folder), and ``config`` / ``overrides``
    that plan mode loads to check them."""

    name: str
    command: list[str]
    timeout_s: int
    figures: Callable[[subprocess.CompletedProcess, Path], dict] = lambda proc, work: {}
    config: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    needs_te: bool = False
    gpus: int = 1  # GPUs the step needs (skipped, saying so, on a machine with fewer)


def _last_json_line(proc: subprocess.CompletedProcess, work: Path) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _pytest_summary(proc: subprocess.CompletedProcess, work: Path) -> dict:
    counts = dict((word, int(n)) for n, word in
                  re.findall(r"(\d+) (passed|failed|skipped|error)", proc.stdout))
    return {"pytest": counts}


def _kernel_timings(proc: subprocess.CompletedProcess, work: Path) -> dict:
    return {"results": json.loads((work / "kernels.json").read_text())["results"]}


def _training_figures(proc: subprocess.CompletedProcess, work: Path) -> dict:
    records = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text()
               .splitlines() if line.strip()]
    later = records[1:] or records  # the first step compiles kernels
    return {"steps": len(records), "loss_first": records[0]["loss"],
            "loss_last": records[-1]["loss"],
            "step_time_s_median": statistics.median(r["step_time_s"] for r in later),
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in later)}


def _train_command(*extra: str, nproc: int = 1) -> list[str]:
    return ["{python}", "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", "29533", "launch/pretrain_grove.py",
            "--config", TINY, *TRAIN_OVERRIDES, "logging.dir={work}/run", *extra]


def gpu_steps() -> list[Step]:
    """The steps of the check, in order, with their time limits (sum <= :data:`BUDGET_S`)."""
    triton = ["kernels.backend=triton"]
    te_fp8 = ["precision.transformer_engine=true", "precision.fp8=hybrid",
              "precision.fp8_recipe=current"]
    # context parallelism (TE attention) over 2 GPUs: Megatron's per-rank sequence halves
    te_cp = ["precision.transformer_engine=true", "parallel.context_parallel_size=2",
             "train.iters=10"]
    return [
        Step("gpu_tests", ["{python}", "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py",
                           "-p", "no:cacheprovider"], 150, _pytest_summary),
        Step("kernel_errors", ["{python}", "tests/gpu_checks.py", "kernels"], 40,
             _last_json_line),
        Step("layer_errors", ["{python}", "tests/gpu_checks.py", "layer"], 30, _last_json_line),
        Step("kernels_benchmark", ["{python}", "benchmarks/kernels.py", "--config", RECIPE,
                                   "--tokens", "8192", "--ep", "8", "--repeats", "20",
                                   "--json", "{work}/kernels.json"], 80, _kernel_timings,
             config=RECIPE),
        Step("train_bf16_triton", _train_command(*triton), 50, _training_figures, config=TINY,
             overrides=TRAIN_OVERRIDES + triton),
        Step("train_step_benchmark", ["{python}", "benchmarks/train_step.py", "--config",
                                      TINY_33B_MOE, "--ep", "1", "--device", "cuda",
                                      "--steps", "10", "--warmup", "2", "--json"], 60,
             _last_json_line, config=TINY_33B_MOE),
        Step("train_te_fp8", _train_command(*te_fp8), 40, _training_figures, config=TINY,
             overrides=TRAIN_OVERRIDES + te_fp8, needs_te=True),
        Step("train_te_cp2", _train_command(*te_cp, nproc=2), 30, _training_figures,
             config=TINY, overrides=TRAIN_OVERRIDES + te_cp, needs_te=True, gpus=2),
    ]


_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-(?P<python>[^-]+)-"
                    r"(?P<abi>[^-]+)-(?P<platform>[^-]+)\.whl$")


def check_wheels(folder: Path, python_tag: str = "cp312") -> dict:
    """The wheels in ``folder``: names, versions, sizes and the problems that would stop the
    check on the GPU machine's Python (``python_tag``, x86-64 Linux): a file name that is not a
    wheel's, a tag for another Python or platform, two versions of one project, a missing
    :data:`REQUIRED_WHEELS`, more than :data:`WHEELS_LIMIT_BYTES` together."""
    wheels, problems, seen = [], [], {}
    for path in sorted(folder.glob("*.whl")):
        match = _WHEEL.match(path.name)
        if match is None:
            problems.append(f"{path.name}: not a wheel file name")
            continue
        name = match["name"].lower().replace("_", "-")
        pythons, platform = match["python"].split("."), match["platform"]
        if not (set(pythons) & {python_tag, "py3"} or match["abi"] == "abi3"):
            problems.append(f"{path.name}: built for {match['python']}, not {python_tag}")
        if platform != "any" and not all(p.startswith("manylinux") and p.endswith("x86_64")
                                         for p in platform.split(".")):
            problems.append(f"{path.name}: platform {platform}, not manylinux x86_64")
        if name in seen and seen[name] != match["version"]:
            problems.append(f"{name}: two versions ({seen[name]}, {match['version']})")
        seen[name] = match["version"]
        wheels.append({"file": path.name, "bytes": path.stat().st_size})
    problems += [f"no wheel of {name} in {folder} (the GPU image lacks it; see "
                 f"scripts/gpu_check.sh for the pip download)"
                 for name in REQUIRED_WHEELS if name not in seen]
    total = sum(w["bytes"] for w in wheels)
    if total > WHEELS_LIMIT_BYTES:
        problems.append(f"wheels total {total / 1e6:.1f} MB > {WHEELS_LIMIT_BYTES / 1e6:.0f} MB")
    return {"folder": str(folder), "wheels": wheels, "total_bytes": total, "problems": problems}


def _environment(python: str) -> dict:
    """Versions and the GPU as the child Python sees them."""
    code = ("import json, sys, torch\n"
            "info = {'python': sys.version.split()[0], 'torch': torch.__version__,\n"
            "        'cuda_available': torch.cuda.is_available(),\n"
            "        'gpu': torch.cuda.get_device_name() if torch.cuda.is_available() else None,\n"
            "        'gpu_count': torch.cuda.device_count()}\n"
            "try:\n    import triton; info['triton'] = triton.__version__\n"
            "except Exception as exc: info['triton'] = f'not importable: {exc}'\n"
            "try:\n    import megatron.core; info['megatron_core'] = megatron.core.__version__\n"
            "    info['megatron_core_path'] = megatron.core.__file__\n"
            "except Exception as exc: info['megatron_core'] = f'not importable: {exc}'\n"
            "try:\n    import transformer_engine.pytorch; info['transformer_engine'] = True\n"
            "except Exception as exc: info['transformer_engine'] = f'not importable: {exc}'\n"
            "print(json.dumps(info))\n")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env=_child_env())
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_env() -> dict[str, str]:
    """Compiled Triton (no interpreter), unbuffered output, this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(paths + [str(ROOT)] * (str(ROOT) not in paths))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _fill(command: list[str], python: str, work: Path) -> list[str]:
    return [part.replace("{python}", python).replace("{work}", str(work)) for part in command]


def _run_step(step: Step, python: str, work: Path) -> dict:
    command = _fill(step.command, python, work)
    began = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                              timeout=step.timeout_s, env=_child_env())
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        return {"status": "timeout", "seconds": step.timeout_s, "command": command,
                "tail": tail.decode(errors="replace") if isinstance(tail, bytes) else tail}
    result = {"status": "ok" if proc.returncode == 0 else "failed",
              "seconds": round(time.perf_counter() - began, 1), "command": command,
              "tail": (proc.stdout[-1500:] + proc.stderr[-1500:]) if proc.returncode else ""}
    if proc.returncode == 0:
        try:
            result["figures"] = step.figures(proc, work)
        except (OSError, ValueError, KeyError, IndexError) as exc:
            result.update(status="failed", tail=f"reading its figures: {exc!r}")
    return result


def _plan_step(step: Step, python: str, work: Path) -> dict:
    """What plan mode checks of a step without a GPU: its files exist, its config and overrides
    load, and (gpu_tests) pytest collects the GPU tests."""
    from megatron_grove.config import ConfigError, load_config

    command = _fill(step.command, python, work)
    problems = [f"{part} is missing" for part in command
                if part.endswith((".py", ".yaml")) and not (ROOT / part).is_file()]
    if step.config:
        try:
            load_config(ROOT / step.config, step.overrides)
        except ConfigError as exc:
            problems.append(f"config: {exc}")
    result = {"status": "planned", "timeout_s": step.timeout_s, "command": command}
    if step.name == "gpu_tests":
        proc = subprocess.run([python, "-m", "pytest", "--collect-only", "-q", "-m", "gpu",
                               "tests/test_gpu.py", "-p", "no:cacheprovider"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env=_child_env())
        collected = [line for line in proc.stdout.splitlines() if "::" in line]
        result["collected"] = collected
        if proc.returncode or len(collected) < 2:
            problems.append(f"pytest collected {len(collected)} GPU tests (rc {proc.returncode})")
    if problems:
        result.update(status="failed", problems=problems)
    return result


def run_gpu_check(plan: bool, out: Path, site: Optional[Path] = None,
                  wheels: Path = ROOT / ".whl", python: str = sys.executable) -> dict:
    """Run (or, with ``plan``, check) every step and write the JSON to ``out`` (atomically);
    returns it. ``site``: where ``scripts/gpu_check.sh`` installed the ``wheels`` (then
    ``megatron.core`` must be imported from there)."""
    report: dict = {"mode": "plan" if plan else "gpu", "started": time.strftime("%F %T"),
                    "budget_s": BUDGET_S, "environment": _environment(python),
                    "wheels": check_wheels(wheels), "steps": {}}
    steps = gpu_steps()
    if sum(step.timeout_s for step in steps) > BUDGET_S:
        report["problems"] = [f"the steps' limits add up to more than {BUDGET_S} s"]
    env = report["environment"]
    if site is not None and report["wheels"]["wheels"]:
        where = str(env.get("megatron_core_path", ""))
        if not where.startswith(str(site)):
            report.setdefault("problems", []).append(
                f"megatron.core imported from {where or 'nowhere'}, not from the wheels in {site}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for step in steps:
            work = Path(tmp) / step.name
            work.mkdir()
            if plan:
                report["steps"][step.name] = _plan_step(step, python, work)
            elif step.needs_te and env.get("transformer_engine") is not True:
                report["steps"][step.name] = {
                    "status": "skipped",
                    "reason": f"transformer_engine: {env.get('transformer_engine')}"}
            elif not env.get("cuda_available"):
                report["steps"][step.name] = {"status": "skipped", "reason": "no CUDA GPU"}
            elif env.get("gpu_count", 1) < step.gpus:
                report["steps"][step.name] = {
                    "status": "skipped",
                    "reason": f"needs {step.gpus} GPUs, this machine has {env.get('gpu_count')}"}
            else:
                report["steps"][step.name] = _run_step(step, python, work)
            _write_json(out, report)
    report["finished"] = time.strftime("%F %T")
    _write_json(out, report)
    return report


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def check_passed(report: dict) -> bool:
    """No problem found and no step failed or timed out."""
    return not report.get("problems") and not report["wheels"]["problems"] and all(
        s["status"] in ("ok", "planned", "skipped") for s in report["steps"].values())
