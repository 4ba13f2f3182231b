"""Separate hosts on one machine for tests: network namespaces (`ip netns`) joined by veth pairs to a bridge.

The bridge lives in a namespace of its own (the "switch"); each host namespace gets `eth0` with an address
of a test-only /24 (10.213.X.0/24, X free on this machine) and `lo` up. The test process itself (the root
namespace) is attached to the switch as one more host, the client, so that it reaches every service.
Cutting a host's cable is `cut(host)`: its switch port goes down, so its packets are dropped and its TCP
connections hang, as with a pulled cable, until `restore(host)`. Every name carries this process's pid;
`close()` kills the processes started in the namespaces and deletes them (which deletes their links).
"""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import OutputProcess

SUBNET_PREFIX = "10.213"


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def netns_unavailable() -> str | None:
    """Why namespaces cannot be made here (not root, no `ip`, a sandbox that forbids them), or None."""
    probe = f"mmprobe{os.getpid()}"
    try:
        made = ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        return "`ip` (iproute2) is not installed"
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> str:
    """A 10.213.X prefix that no interface of the root namespace uses yet (pid-based first guess)."""
    used = ip("-4", "-o", "addr").stdout + ip("-4", "route").stdout
    for i in range(256):
        prefix = f"{SUBNET_PREFIX}.{(os.getpid() + i) % 254 + 1}"
        if f"{prefix}." not in used:
            return prefix
    raise RuntimeError(f"no free /24 in {SUBNET_PREFIX}.0.0/16")


class HostProcess(OutputProcess):
    """A process started inside a host's namespace; `lines` collects its stdout and stderr."""

    def __init__(self, namespace: str, argv: list[str]):
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)  # as `moemesh up` runs its services
        super().__init__(["ip", "netns", "exec", namespace, *argv], env)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout_s: float) -> None:
        try:
            self.proc.wait(max(0.0, timeout_s))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Network:
    """A switch namespace with a bridge, host namespaces cabled to it, and the root namespace as the client."""

    def __init__(self):
        self.tag = f"mm{os.getpid()}"
        self.prefix = _free_subnet()
        self.switch = f"{self.tag}-sw"
        self.client_link = f"{self.tag}c"  # in the root namespace: at most 15 characters
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, switch port, address)
        self.processes: list[HostProcess] = []
        try:
            ip("netns", "add", self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
            ip("link", "add", self.client_link, "type", "veth", "peer", "name", "client", "netns", self.switch)
            self._plug("client")
            ip("addr", "add", f"{self.prefix}.254/24", "dev", self.client_link)
            ip("link", "set", self.client_link, "up")
        except BaseException:
            self.close()
            raise

    def _plug(self, port: str) -> None:
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")

    def add_host(self, name: str) -> str:
        """A new host namespace cabled to the switch; its address."""
        namespace, port = f"{self.tag}-{name}", f"p{len(self.hosts)}"
        address = f"{self.prefix}.{10 + len(self.hosts)}"
        ip("netns", "add", namespace)
        self.hosts[name] = (namespace, port, address)
        ip("-n", namespace, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        self._plug(port)
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", namespace, "link", "set", "eth0", "up")
        return address

    def start(self, host: str, *argv: str) -> HostProcess:
        process = HostProcess(self.hosts[host][0], list(argv))
        self.processes.append(process)
        return process

    def start_moemesh(self, host: str, role: str, model_dir: Path, *args: str) -> HostProcess:
        """`moemesh <role>` on `host`, bound to its address (fixed port 7000: each host has its own ports)."""
        address = self.hosts[host][2]
        return self.start(host, sys.executable, "-m", "moemesh.cli", role, "--model", str(model_dir),
                          "--host", address, "--port", "7000", "--dtype", "float32", *args)  # fmt: skip

    def cut(self, host: str) -> None:
        """Pulls the host's cable at the switch: its packets are dropped, its connections hang."""
        ip("-n", self.switch, "link", "set", self.hosts[host][1], "down")

    def restore(self, host: str) -> None:
        ip("-n", self.switch, "link", "set", self.hosts[host][1], "up")

    def close(self) -> None:
        """Stops the processes (SIGTERM to all at once, SIGKILL after 15 s) and deletes the namespaces."""
        for process in reversed(self.processes):
            process.terminate()
        deadline = time.monotonic() + 15
        for process in self.processes:
            process.wait(deadline - time.monotonic())
        for namespace, _, _ in self.hosts.values():
            ip("netns", "del", namespace, check=False)
        ip("netns", "del", self.switch, check=False)  # takes the switch ends of the veth pairs with it
        ip("link", "del", self.client_link, check=False)  # gone with its peer already, unless that failed
