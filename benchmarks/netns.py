"""Emulated nodes on one machine: Linux network namespaces joined by veth pairs to a bridge, each node's link shaped
with ``tc qdisc ... tbf``; the cluster benchmark (``cluster.py``) runs one ``torchrun`` agent in each.

Topology, for every K (also K = 2, so that every K has the same path: node, veth, bridge, veth, node)::

    namespace <name>n0: ddlink 10.213.0.1/24 ──veth── ddport0 ┐
    namespace <name>n1: ddlink 10.213.0.2/24 ──veth── ddport1 ├ bridge ddbr in namespace <name>sw
    ...                                                       ┘

Every device is created directly inside the namespace it lives in, so nothing is added to the machine's own network
namespace, and the addresses (10.213.0.0/24) exist only inside these namespaces. ``<name>`` is ``ddcl<pid>`` of the
process that built them; at start, leftovers of a run whose process is gone (a crash, a SIGKILL) are removed, and
those of a live process (another session's run) are left alone.

*Shaping, both directions.* A real node's NIC port carries R bit/s each way (full duplex). The node's own egress
(``ddlink`` in the node) is shaped to R, so it sends at most R; the switch's egress towards the node (``ddport<i>``
in the switch) is shaped to R too, so it receives at most R, also where several nodes send to it at once (a gather
onto one node). A ring all-reduce sends and receives the same bytes on every node, so the two limits are equally
binding there. ``tbf``: burst max(64 KiB, 1 ms at R) (the bucket refills by high-resolution timers; 64 KiB covers
one GSO segment of the veth), latency 100 ms (the queue a switch port may hold before it drops).

Everything made is removed by :meth:`Cluster.close`: on a normal end, an exception, SIGINT and SIGTERM (turned into
an exception, so that ``finally`` blocks run); the processes started in a namespace are killed first (a namespace
with a process inside it would outlive ``ip netns del``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Self

PREFIX = "ddcl"
SUBNET = "10.213.0"  # /24; node i is SUBNET.(i + 1)
LINK, PORT, BRIDGE = "ddlink", "ddport", "ddbr"
MIN_BURST = 64 * 1024  # bytes
QUEUE_LATENCY = "100ms"
TRANSFER = Path(__file__).resolve().parent / "netns_transfer.py"


class ClusterUnavailable(RuntimeError):
    """This machine cannot build the emulated cluster (no root, no iproute2, no network namespaces)."""


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: unwinds to the ``finally`` blocks that remove the namespaces."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


def requirements() -> str | None:
    """Why the emulated cluster cannot be built here (one line), or None where it can."""
    if sys.platform != "linux":
        return "the emulated cluster needs Linux network namespaces; this is " + sys.platform
    if os.geteuid() != 0:
        return "the emulated cluster needs root (network namespaces, tc); run it as root, e.g. with sudo"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"the emulated cluster needs iproute2 ({' and '.join(missing)} not found); install it (apt-get install iproute2)"
    probe = f"{PREFIX}{os.getpid()}probe"
    done = _ip(["netns", "add", probe], check=False)
    if done.returncode != 0:
        return f"cannot create a network namespace (ip netns add: {done.stderr.strip()}); run as root outside a sandbox"
    _ip(["netns", "del", probe], check=False)
    return None


def _run(command: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(list(command), capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _ip(args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess:
    return _run(["ip", *args], check)


def namespaces() -> list[str]:
    """The names of the machine's network namespaces."""
    done = _ip(["-j", "netns", "list"], check=False)
    if done.returncode != 0 or not done.stdout.strip():
        return []
    return [entry["name"] for entry in json.loads(done.stdout)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(prefix: str = PREFIX) -> list[str]:
    """Remove the namespaces (and the processes in them) of earlier runs with ``prefix`` whose process is gone."""
    removed = []
    for name in namespaces():
        match = re.fullmatch(rf"{re.escape(prefix)}(\d+)(?:n\d+|sw|probe)", name)
        if match and not _alive(int(match.group(1))):
            _kill_namespace_processes(name)
            _ip(["netns", "del", name], check=False)
            removed.append(name)
    return removed


def _kill_namespace_processes(name: str) -> None:
    """SIGKILL every process inside namespace ``name`` (all of them were started there by a run of this module)."""
    done = _ip(["netns", "pids", name], check=False)
    for pid in (int(p) for p in done.stdout.split() if p.isdigit()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def burst_bytes(rate_bps: float) -> int:
    """The tbf bucket for ``rate_bps``: 1 ms at that rate, at least :data:`MIN_BURST`."""
    return max(MIN_BURST, int(rate_bps / 8 / 1000))


def rate_text(rate_bps: float | None) -> str:
    """``10 Gbit/s``, ``100 Mbit/s``, ... or ``unshaped``."""
    if rate_bps is None:
        return "unshaped"
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if rate_bps >= scale:
            return f"{rate_bps / scale:g} {unit}"
    return f"{rate_bps:g} bit/s"


class Cluster:
    """K emulated nodes (see the module docstring). Use as a context manager, or call :meth:`close` in a
    ``finally``; SIGINT and SIGTERM raise :class:`Interrupted` while it is open."""

    def __init__(self, nodes: int, prefix: str = PREFIX):
        if nodes < 2:
            raise ValueError(f"an emulated cluster needs at least 2 nodes, got {nodes}")
        self.k, self.name = nodes, f"{prefix}{os.getpid()}"
        self.switch = f"{self.name}sw"
        self.nodes = [f"{self.name}n{i}" for i in range(nodes)]
        self.rate_bps: float | None = None
        self.processes: list[subprocess.Popen] = []
        self._handlers: dict[int, object] = {}
        self._created: list[str] = []

    # -- lifetime -------------------------------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        """Remove dead runs' leftovers, then build the namespaces, the bridge and the links (unshaped)."""
        remove_leftovers()
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._handlers[signum] = signal.signal(signum, _raise_interrupted)
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        for ns in (self.switch, *self.nodes):
            _ip(["netns", "add", ns])
            self._created.append(ns)
            _ip(["-n", ns, "link", "set", "lo", "up"])
        _ip(["-n", self.switch, "link", "add", BRIDGE, "type", "bridge"])
        _ip(["-n", self.switch, "link", "set", BRIDGE, "up"])
        for i, ns in enumerate(self.nodes):
            port = f"{PORT}{i}"
            _ip(["link", "add", "name", LINK, "netns", ns, "type", "veth", "peer", "name", port, "netns", self.switch])
            _ip(["-n", self.switch, "link", "set", port, "master", BRIDGE])
            _ip(["-n", self.switch, "link", "set", port, "up"])
            _ip(["-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", LINK])
            _ip(["-n", ns, "link", "set", LINK, "up"])

    def close(self) -> None:
        """Kill the processes started in the namespaces, delete the namespaces (their devices go with them), and
        put the signal handlers back. Safe to call more than once; a second SIGINT or SIGTERM does not interrupt
        it."""
        for signum in self._handlers:
            signal.signal(signum, signal.SIG_IGN)
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        self.processes.clear()
        for ns in reversed(self._created):
            _kill_namespace_processes(ns)
            _ip(["netns", "del", ns], check=False)
        self._created.clear()
        for signum, handler in self._handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._handlers.clear()

    # -- the links ------------------------------------------------------------------------------------------------
    def address(self, node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def interfaces(self) -> list[tuple[str, str]]:
        """``(namespace, device)`` of every shaped egress: each node's link, and each switch port."""
        return [(ns, LINK) for ns in self.nodes] + [(self.switch, f"{PORT}{i}") for i in range(self.k)]

    def shape(self, rate_bps: float | None) -> None:
        """Shape every link to ``rate_bps`` bit/s each way (None: remove the shaping)."""
        for ns, device in self.interfaces():
            if rate_bps is None:
                _ip(["netns", "exec", ns, "tc", "qdisc", "del", "dev", device, "root"], check=False)
            else:
                _ip(
                    [
                        "netns",
                        "exec",
                        ns,
                        "tc",
                        "qdisc",
                        "replace",
                        "dev",
                        device,
                        "root",
                        "tbf",
                        "rate",
                        f"{int(rate_bps)}bit",
                        "burst",
                        str(burst_bytes(rate_bps)),
                        "latency",
                        QUEUE_LATENCY,
                    ]
                )
        self.rate_bps = rate_bps

    def qdisc_stats(self) -> dict[str, dict[str, int]]:
        """tc's counters of every shaped egress (bytes sent, packets dropped, overlimits), by ``namespace/device``;
        empty where the links are unshaped."""
        stats = {}
        for ns, device in self.interfaces():
            done = _ip(["netns", "exec", ns, "tc", "-s", "-j", "qdisc", "show", "dev", device], check=False)
            for qdisc in json.loads(done.stdout or "[]"):
                if qdisc.get("kind") == "tbf":
                    stats[f"{ns}/{device}"] = {k: int(qdisc.get(k, 0)) for k in ("bytes", "drops", "overlimits")}
        return stats

    def measure_rate(self, seconds: float = 1.0) -> float:
        """Bit/s of one TCP stream from node 1 to node 0, for about ``seconds`` (capped at 200 MB): whether the
        shaping does what it says."""
        port = 29400
        limit = int(min(2e8, (self.rate_bps or 8e10) / 8 * seconds))
        server = self.popen(
            0,
            [sys.executable, str(TRANSFER), "receive", self.address(0), str(port), str(limit)],
            stdout=subprocess.PIPE,
        )
        try:
            client = self.popen(
                1,
                [sys.executable, str(TRANSFER), "send", self.address(0), str(port), str(limit)],
                stdout=subprocess.DEVNULL,
            )
            client.wait(timeout=seconds * 20 + 30)
            out, _ = server.communicate(timeout=seconds * 20 + 30)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
        return float(out.split()[-1])

    # -- processes --------------------------------------------------------------------------------------------------
    def popen(
        self, node: int, argv: Sequence[str], env: dict[str, str] | None = None, **kwargs: object
    ) -> subprocess.Popen:
        """Start ``argv`` inside node ``node``'s namespace, in a session of its own (so that :meth:`close` can kill
        it with everything it started)."""
        command = ["ip", "netns", "exec", self.nodes[node], *argv]
        process = subprocess.Popen(command, env=env, start_new_session=True, **kwargs)  # type: ignore[call-overload]
        self.processes.append(process)
        return process

    def wait_all(
        self, processes: Sequence[subprocess.Popen], timeout: float, complete: Callable[[], bool] = lambda: False
    ) -> list[int]:
        """Wait for all ``processes``; once one fails, the others get 30 s before they are killed (a failed node
        leaves the others waiting at a collective), none where ``complete()`` says that their work is done.
        Returns the exit statuses."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in processes):
            if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p in processes):
                grace = time.monotonic() + (30 if time.monotonic() <= deadline and not complete() else 0)
                while any(p.poll() is None for p in processes) and time.monotonic() < grace:
                    time.sleep(0.2)
                for p in processes:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
                        p.wait()
                break
            time.sleep(0.1)
        return [p.returncode for p in processes]


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)
