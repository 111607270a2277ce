"""An emulated cluster on one machine: ``nodes`` Linux network namespaces joined through a
switch namespace (a bridge) by veth links, each link rate-limited with ``tc``.

    node ns  <prefix>-n<i>:  lo (up; the node's "NVLink")  +  emu0  198.18.0.<i+1>/24
                                  |  veth, tc tbf at <gbps> on egress
    switch ns <prefix>-sw:   emu-p<i>  -- bridge emu-br  (tc tbf at <gbps> on egress)

Every interface is created directly inside its namespace (nothing is created in, or moved
through, the caller's namespace) and only addresses of 198.18.0.0/15 (RFC 2544 benchmarking) are
used. Ranks in one node namespace reach each other over its loopback; only traffic between
nodes crosses ``emu0``, whose kernel counters (``/sys/class/net/emu0/statistics/tx_bytes``,
read inside the namespace) say what crossed. :class:`EmulatedCluster` is a context manager that
tears everything down on exit, on error and on SIGINT/SIGTERM (``ip netns del`` removes a
namespace's interfaces with it).

The link speed is a token bucket (``tc tbf``) per direction of each node's link. A delay needs
the ``netem`` qdisc; where the kernel lacks it, asking for a delay is refused
(:class:`ClusterUnavailable`) rather than silently ignored.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["LINK_DEVICE", "ClusterUnavailable", "LinkSpec", "EmulatedCluster",
           "check_can_emulate", "link_tx_bytes", "run_torchrun"]

LINK_DEVICE = "emu0"  # a node's link, inside its namespace
_NETWORK = ipaddress.ip_network("198.18.0.0/24")  # inside 198.18.0.0/15
_BRIDGE = "emu-br"


class ClusterUnavailable(RuntimeError):
    """The emulated cluster cannot be built here (one line saying why and what to do)."""


@dataclass(frozen=True)
class LinkSpec:
    """The emulated nodes and their links (rate per direction of each node's link)."""

    nodes: int = 2
    ranks_per_node: int = 1
    link_gbps: float = 1.0  # Gbit/s
    link_delay_ms: float = 0.0  # one way, per link (needs the netem qdisc)
    mtu: int = 9000

    def problems(self) -> list[str]:
        out = []
        if not 2 <= self.nodes <= 250:
            out.append(f"--nodes {self.nodes} must be in 2..250")
        if self.ranks_per_node < 1:
            out.append(f"--ranks-per-node {self.ranks_per_node} must be >= 1")
        if self.link_gbps <= 0:
            out.append(f"--link-gbps {self.link_gbps} must be > 0")
        if self.link_delay_ms < 0:
            out.append(f"--link-delay-ms {self.link_delay_ms} must be >= 0")
        if not 1280 <= self.mtu <= 65535:
            out.append(f"--mtu {self.mtu} must be in 1280..65535")
        return out


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(cmd), capture_output=True, text=True)
    if check and done.returncode:
        said = (done.stderr or done.stdout).strip().splitlines()
        raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {said[-1] if said else 'no output'}")
    return done


def check_can_emulate() -> None:
    """Raise :class:`ClusterUnavailable` unless this process is root and ``ip netns`` and
    ``tc`` work."""
    if os.geteuid() != 0:
        raise ClusterUnavailable("the emulated cluster needs root (network namespaces, veth "
                                 "links, tc): run it as root")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise ClusterUnavailable(f"the emulated cluster needs `{tool}` (iproute2): install "
                                     "it (apt-get install iproute2)")
    if _run(["ip", "netns", "list"], check=False).returncode:
        raise ClusterUnavailable("`ip netns` is unavailable here (no network namespace "
                                 "support): run on a Linux host with namespaces")


def link_tx_bytes(device: str = LINK_DEVICE) -> int:
    """The kernel's count of bytes sent on ``device`` of the calling process's network
    namespace (``/sys/class/net``, which ``ip netns exec`` mounts for the namespace)."""
    return int(Path(f"/sys/class/net/{device}/statistics/tx_bytes").read_text())


class EmulatedCluster:
    """The namespaces and links of one :class:`LinkSpec`; ``with EmulatedCluster(spec) as c:``
    builds them and always removes them. ``prefix`` names the namespaces (unique per process by
    default, so concurrent clusters do not meet)."""

    def __init__(self, spec: LinkSpec, prefix: str | None = None) -> None:
        self.spec = spec
        self.prefix = prefix or f"grove-emu-{os.getpid()}"
        self.switch = f"{self.prefix}-sw"
        self.node_namespaces = [f"{self.prefix}-n{i}" for i in range(spec.nodes)]
        self._created: list[str] = []
        self._previous_handlers: dict[int, object] = {}

    # ---------------------------------------------------------------- addresses, commands
    def address(self, node: int) -> str:
        """Node ``node``'s address on its link."""
        return str(_NETWORK.network_address + node + 1)

    def exec_prefix(self, node: int) -> list[str]:
        """The command prefix that runs a program inside node ``node``'s namespace."""
        return ["ip", "netns", "exec", self.node_namespaces[node]]

    def link_bytes(self) -> dict[str, list[int]]:
        """Per node, the bytes its link sent (``tx``) and received (``rx``) so far (kernel
        counters read inside the namespace)."""
        out: dict[str, list[int]] = {"tx": [], "rx": []}
        for node in range(self.spec.nodes):
            for direction in ("tx", "rx"):
                done = _run([*self.exec_prefix(node), "cat",
                             f"/sys/class/net/{LINK_DEVICE}/statistics/{direction}_bytes"])
                out[direction].append(int(done.stdout))
        return out

    # ---------------------------------------------------------------- build and tear down
    def __enter__(self) -> "EmulatedCluster":
        problems = self.spec.problems()
        if problems:
            raise ClusterUnavailable("; ".join(problems))
        check_can_emulate()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _on_signal(self, signum: int, frame) -> None:
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    def _namespace(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._created.append(name)
        _run(["ip", "-n", name, "link", "set", "lo", "up"])

    def _shape(self, namespace: str, device: str) -> None:
        """Rate (and delay) on ``device``'s egress."""
        bits = self.spec.link_gbps * 1e9
        tc = ["ip", "netns", "exec", namespace, "tc", "qdisc", "add", "dev", device, "root"]
        if self.spec.link_delay_ms > 0:
            done = _run([*tc, "netem", "delay", f"{self.spec.link_delay_ms}ms",
                         "rate", f"{bits:.0f}bit", "limit", "100000"], check=False)
            if done.returncode:
                raise ClusterUnavailable(
                    f"--link-delay-ms {self.spec.link_delay_ms:g} needs the netem qdisc, which "
                    "this kernel lacks (tc: "
                    f"{done.stderr.strip()}): drop --link-delay-ms (rate limits still work)")
            return
        # a bucket of >= 4 ms at the rate (and >= 4 MTUs) keeps tbf from throttling below it;
        # a queue of 100 ms of traffic keeps TCP from dropping much
        burst = max(int(bits / 8 * 0.004), 4 * self.spec.mtu)
        _run([*tc, "tbf", "rate", f"{bits:.0f}bit", "burst", str(burst), "latency", "100ms"])

    def _build(self) -> None:
        self._namespace(self.switch)
        sw = ["ip", "-n", self.switch]
        _run([*sw, "link", "add", _BRIDGE, "type", "bridge"])
        _run([*sw, "link", "set", _BRIDGE, "up"])
        for node, ns in enumerate(self.node_namespaces):
            self._namespace(ns)
            port = f"emu-p{node}"
            _run(["ip", "link", "add", LINK_DEVICE, "netns", ns, "mtu", str(self.spec.mtu),
                  "type", "veth", "peer", "name", port, "netns", self.switch,
                  "mtu", str(self.spec.mtu)])
            _run([*sw, "link", "set", port, "master", _BRIDGE])
            _run([*sw, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(node)}/{_NETWORK.prefixlen}",
                  "dev", LINK_DEVICE])
            _run(["ip", "-n", ns, "link", "set", LINK_DEVICE, "up"])
            self._shape(ns, LINK_DEVICE)
            self._shape(self.switch, port)
        _run([*sw, "link", "set", _BRIDGE, "mtu", str(self.spec.mtu)])

    def close(self) -> None:
        """Delete every namespace this cluster made (their interfaces go with them) and put
        the signal handlers back; safe to call twice."""
        while self._created:
            name = self._created.pop()
            pids = _run(["ip", "netns", "pids", name], check=False).stdout.split()
            for pid in pids:  # processes still inside: ours (the cluster's runs)
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", name], check=False)
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()


def _wait_for_listener(cluster: EmulatedCluster, port: int, launcher: subprocess.Popen,
                       timeout_s: float) -> None:
    """Until node 0's launcher listens on ``port`` (its c10d store), so that the other nodes'
    launchers find it on their first try."""
    deadline = time.monotonic() + timeout_s
    while True:
        listening = _run([*cluster.exec_prefix(0), "ss", "-Hltn", f"sport = :{port}"],
                         check=False).stdout.strip()
        if listening:
            return
        if launcher.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"node 0's launcher never opened the rendezvous store on port "
                               f"{port} (exit code {launcher.poll()})")
        time.sleep(0.2)


def run_torchrun(cluster: EmulatedCluster, program: Sequence[str], log_dir: Path,
                 env: dict[str, str], timeout_s: float, port: int = 29500) -> list[int]:
    """One ``torchrun`` per node namespace running ``program`` (a script and its arguments) on
    ``ranks_per_node`` processes: c10d rendezvous hosted by node 0 (``is_host=1`` there, 0
    elsewhere: inside a namespace torchrun cannot tell), gloo bound to the node's link
    (``GLOO_SOCKET_IFNAME``), ranks of one node talking over its loopback. Node ``i`` writes
    ``log_dir/node<i>.log``. Returns the launchers' exit codes; when one fails, the others are
    stopped (SIGTERM, then SIGKILL after 10 s) and their codes returned too."""
    spec = cluster.spec
    launchers: list[subprocess.Popen] = []
    job = f"emu{os.getpid()}"
    try:
        for node in range(spec.nodes):
            cmd = [*cluster.exec_prefix(node), sys.executable, "-m", "torch.distributed.run",
                   "--nnodes", str(spec.nodes), "--nproc-per-node", str(spec.ranks_per_node),
                   "--rdzv-backend", "c10d", "--rdzv-endpoint", f"{cluster.address(0)}:{port}",
                   "--rdzv-id", job, "--local-addr", cluster.address(node),
                   "--rdzv-conf", f"is_host={1 if node == 0 else 0}", "--max-restarts", "0",
                   *program]
            with open(log_dir / f"node{node}.log", "w") as log:
                launchers.append(subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, **env, "GLOO_SOCKET_IFNAME": LINK_DEVICE}))
            if node == 0:
                _wait_for_listener(cluster, port, launchers[0], timeout_s=120)
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p in launchers):
            failed = [p for p in launchers if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in launchers:
            if p.poll() is None:
                p.terminate()
        for p in launchers:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return [p.returncode for p in launchers]
