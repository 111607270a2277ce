"""The emulated cluster (benchmarks/emulated_cluster.py): network namespaces joined by
tc-shaped veth links, one torchrun per namespace. A short training-step run over 2 nodes x 1
rank: the links' kernel counters saw the traffic (and the planner's projection of it), the
variants trained the same losses; a killed rank, a SIGTERM and a refused flag leave no
namespace behind. Without root and `ip netns` these tests skip saying so."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from processes import ROOT, TINY, child_env
from megatron_grove.benchmarking import emulated_cluster
from megatron_grove.benchmarking.emulated_cluster import ClusterUnavailable, check_can_emulate

CLI = ROOT / "benchmarks" / "emulated_cluster.py"


def _can_emulate() -> bool:
    try:
        check_can_emulate()
    except ClusterUnavailable:
        return False
    return True


needs_netns = pytest.mark.skipif(not _can_emulate(), reason="needs root and ip netns")


def _namespaces(pid: int) -> list[str]:
    """The namespaces the CLI with process id ``pid`` made that still exist."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in listed.splitlines()
            if line.startswith(f"grove-emu-{pid}-")]


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(CLI), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env())


def _workers_in(namespace: str) -> list[int]:
    """The benchmark ranks (not their launcher) running inside ``namespace``."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                          text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if b"--worker" in cmd and b"torch.distributed.run" not in cmd:
            out.append(int(pid))
    return out


def _wait_for_workers(proc: subprocess.Popen, nodes: int, timeout_s: float = 240) -> list[int]:
    """Until every node namespace runs a benchmark rank; one rank per node."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        found = [_workers_in(f"grove-emu-{proc.pid}-n{i}") for i in range(nodes)]
        if all(found):
            return [ranks[0] for ranks in found]
        time.sleep(0.5)
    raise AssertionError("the ranks never started inside the namespaces")


def test_refuses_without_root(monkeypatch):
    monkeypatch.setattr(emulated_cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(ClusterUnavailable, match="needs root"):
        check_can_emulate()


@pytest.mark.e2e
@needs_netns
def test_train_steps_over_emulated_links():
    proc = _start("--nodes", "2", "--ranks-per-node", "1", "--link-gbps", "1", "--json",
                  "train_step", "--config", str(TINY), "--steps", "1", "--warmup", "1")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert _namespaces(proc.pid) == []
    result = json.loads(out)
    (run,) = result["runs"]
    assert run["run"]["link_bytes"]["tx"] > 0
    # what the nodes sent is what they received (one link each, through one bridge)
    assert abs(run["run"]["link_bytes"]["tx"] - run["run"]["link_bytes"]["rx"]) \
        < 0.01 * run["run"]["link_bytes"]["tx"]
    for variant, row in run["per_variant"].items():
        assert row["link_bytes"] > 0, variant
        # the planner's projection (dispatch + dense gradient all-reduce) within 5%
        assert abs(row["bytes_ratio"] - 1) < 0.05, (variant, row)
    losses = run["summary"]["losses"]
    assert all(math.isfinite(x) for v in losses.values() for x in v)
    # adjugates as virtual experts and group-aware dispatch compute the same function
    assert run["summary"]["loss_max_abs_diff_virtual_vs_group_aware"] < 1e-4
    # fewer rows on the wire: group-aware sends less than virtual experts
    assert run["per_variant"]["group_aware"]["link_bytes"] \
        < run["per_variant"]["virtual"]["link_bytes"]


LONG_DISPATCH = ("--nodes", "2", "--ranks-per-node", "1", "--link-gbps", "0.5", "dispatch",
                 "--experts", "16", "--topk", "4", "--groups", "8", "--tokens", "256",
                 "--hidden", "64", "--iters", "100000")


@pytest.mark.e2e
@needs_netns
def test_killed_rank_leaves_no_namespace():
    proc = _start(*LONG_DISPATCH)
    try:
        ranks = _wait_for_workers(proc, nodes=2)
        time.sleep(3)
        os.kill(ranks[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "a rank failed on the emulated cluster" in err.strip().splitlines()[-1]
    assert _namespaces(proc.pid) == []


@pytest.mark.e2e
@needs_netns
def test_sigterm_leaves_no_namespace():
    proc = _start(*LONG_DISPATCH)
    try:
        _wait_for_workers(proc, nodes=2)
        assert len(_namespaces(proc.pid)) == 3  # two nodes and the switch
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    assert _namespaces(proc.pid) == []


def _kernel_has_netem() -> bool:
    """Whether tc can add a netem qdisc (tried on the loopback of a throwaway namespace)."""
    name = f"grove-emu-{os.getpid()}-probe"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        added = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo",
                                "root", "netem", "delay", "1ms"], capture_output=True)
        return added.returncode == 0
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@needs_netns
def test_link_delay_refused_without_netem():
    """Where the kernel has no netem qdisc, a delay is refused in one line (exit 2) and the
    half-built cluster is removed."""
    if _kernel_has_netem():
        pytest.skip("needs a kernel without the netem qdisc (this one has it)")
    proc = _start("--link-delay-ms", "1", "dispatch", "--experts", "16", "--topk", "4",
                  "--groups", "8")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("emulated_cluster.py:")]
    assert "netem" in line and "--link-delay-ms" in line
    assert _namespaces(proc.pid) == []
