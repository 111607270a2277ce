"""torchrun that exits with the job's own code.

    python -m megatron_grove.launch --nproc-per-node 2 launch/pretrain_grove.py \\
        --config configs/tiny_cpu.yaml parallel.expert_model_parallel_size=2

The same flags as ``torchrun`` (``torch.distributed.run``'s parser and ``run``: the same
elastic agent, rendezvous and signal forwarding). What differs is the end of a failed job:

* the exit code is the first failing worker's own (docs/fault_tolerance.md): 2 bad input,
  3 non-finite stop, 4 preempted (saved), 128+N a worker killed by signal N; 1 only when
  every failure is 1 (a collective failed, or an unexpected error);
* no ``ChildFailedError`` traceback after a worker's one-line report; one ``launch:`` line
  names the worker whose code the job takes. An unexpected exception keeps the traceback the
  worker printed itself.

"First": a worker's code other than 1 wins over 1 (the peers of a failing rank see their
collective fail, 1, after it), the earliest such exit among them; a worker killed by a signal
counts only before the first worker's report (after it, the agent itself stops the other
workers: :func:`job_exit_code`); the workers write
their codes (:mod:`megatron_grove.job_exit`) to a temporary folder this launcher names in
their environment, so the code survives a signal to the launcher too (torchrun's agent keeps
no worker codes then). Under several launchers (one per node) each exits with its node's
first failure.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

from megatron_grove.job_exit import EXIT_DIR_ENV, LAUNCHER_PID_ENV, WorkerExit, read_exits

__all__ = ["job_exit_code", "main"]

PROG = "python -m megatron_grove.launch"
EPILOG = """\
exit codes (the first failing worker's; see docs/fault_tolerance.md):
  0 every worker finished
  1 a collective failed (a peer died, hung or the network failed) or an unexpected error
  2 bad input (configuration, pre-flight, data, checkpoint): fix what the one line names
  3 stopped after too many non-finite steps
  4 preempted (SIGTERM / SIGINT / SIGUSR1): the current step is saved; run the same command
  128+N a worker was killed by signal N (e.g. 137: SIGKILL, often the OOM killer)
"""
_MEANING = {1: "a collective failed or an unexpected error", 2: "bad input", 3: "non-finite stop",
            4: "preempted"}


def _meaning(code: int) -> str:
    if code > 128:
        try:
            return f"killed by {signal.Signals(code - 128).name}"
        except ValueError:
            return f"killed by signal {code - 128}"
    return _MEANING.get(code, "failed")


def job_exit_code(reported: list[WorkerExit], failures: dict[int, tuple[int, float]],
                  launcher_signal: int | None = None) -> tuple[int, int | None]:
    """``(exit code, rank it comes from or None)`` of a job whose workers ``reported`` their
    non-zero exits and whose agent saw ``failures`` (``{rank: (torch's exitcode, time)}``, a
    negative exitcode -N: killed by signal N; whole seconds); ``launcher_signal``: the signal
    that stopped the launcher, if any.

    In this order: the earliest reported code other than 1; a worker killed (no report)
    before the first report, in an earlier second (the agent kills the other workers *after*
    a failure: those deaths are not causes); a reported 1; any other failure; 128 + the
    launcher's signal; 0."""
    first_report = min((e.time for e in reported), default=None)
    killed = sorted((WorkerExit(rank, 128 - code if code < 0 else code, when)
                     for rank, (code, when) in failures.items()
                     if code != 0 and rank not in {e.rank for e in reported}),
                    key=lambda e: e.time)
    ordinary = [e for e in reported if e.code not in (0, 1)]
    early_kills = [e for e in killed if first_report is None or e.time < int(first_report)]
    for candidates in (ordinary, early_kills, [e for e in reported if e.code == 1], killed):
        if candidates:
            first = min(candidates, key=lambda e: e.time)
            return first.code, first.rank
    if launcher_signal is not None:
        return 128 + launcher_signal, None
    return 0, None


def _parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    parser.prog = PROG
    parser.description = __doc__.split("\n\n")[0] + (
        " Takes torchrun's flags; the training script and its arguments follow them.")
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import run

    args = _parser().parse_args(argv)
    failures: dict[int, tuple[int, float]] = {}
    stopped_by = None
    with tempfile.TemporaryDirectory(prefix="megatron-grove-exits-") as folder:
        os.environ.update({EXIT_DIR_ENV: folder, LAUNCHER_PID_ENV: str(os.getpid())})  # the
        # workers inherit them
        try:
            run(args)
        except ChildFailedError as exc:
            failures = {rank: (f.exitcode, float(f.timestamp)) for rank, f in exc.failures.items()}
        except SignalException as exc:
            stopped_by = int(exc.sigval)
        code, rank = job_exit_code(read_exits(folder), failures, stopped_by)
    if code and rank is not None:
        print(f"launch: exit {code} ({_meaning(code)}): from rank {rank}"
              + (" (its line is above)" if code < 128 else ""), file=sys.stderr, flush=True)
    elif code:
        print(f"launch: exit {code}: stopped by {signal.Signals(stopped_by).name} before any "
              "worker reported", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
