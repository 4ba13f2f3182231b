"""`moemesh up`: a whole cluster on loopback (redis-server, N expert shards x R replicas, router, gateway).

Children start in dependency order; each prints `<role> listening on HOST:PORT` when it can serve.
A child that dies ends the cluster with a clear message and a non-zero exit; SIGINT/SIGTERM stops
every child. Children also get SIGTERM from the kernel if this process dies (PR_SET_PDEATHSIG).
"""

import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

READY = re.compile(r"^(\w+) listening on (\S+)$")
START_TIMEOUT_S = 300


class ClusterError(Exception):
    """A child failed to start or died; the message names it."""


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    reported: bool = False  # its exit was logged

    def pump_output(self) -> None:
        """Echoes the child's stdout with its name, and catches its ready line."""
        for line in self.proc.stdout:
            match = READY.match(line.strip())
            if match and not self.ready.is_set():
                self.address = match.group(2)
                print(f"[{self.name}] ready on {self.address}", flush=True)
                self.ready.set()
            else:
                print(f"[{self.name}] {line}", end="", flush=True)
        self.ready.set()  # exited: wake whoever waits for it

    def wait_ready(self, timeout_s: float) -> str:
        if not self.ready.wait(timeout_s):
            raise ClusterError(f"{self.name} did not become ready within {timeout_s:g}s")
        if self.address is None:
            raise ClusterError(
                f"{self.name} exited with code {self.proc.wait()} before it was ready (its log is above)"
            )
        return self.address


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, host: str):
        self.host = host
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str]) -> Child:
        # Services take turns on the same cores (the gateway waits while the experts compute): OpenMP
        # threads that spin while idle would steal the cores the other services need.
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | dict(os.environ)
        proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1, env=env,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        child = Child(name, proc)
        threading.Thread(target=child.pump_output, name=f"out-{name}", daemon=True).start()
        self.children.append(child)
        return child

    def service(self, name: str, role: str, flags: dict[str, object]) -> Child:
        argv = [sys.executable, "-m", "moemesh.cli", role]
        for flag, value in flags.items():
            if value is not None:
                argv += [f"--{flag}", str(value)]
        return self.spawn(name, argv)

    def start_redis(self, data_dir: Path) -> str:
        port = _free_port(self.host)
        argv = ["redis-server", "--bind", self.host, "--port", str(port), "--dir", str(data_dir),
                "--appendonly", "yes", "--save", "", "--protected-mode", "no"]  # fmt: skip
        try:
            child = self.spawn("redis", argv)
        except FileNotFoundError:
            raise ClusterError("redis-server not found: run `make install` or pass --redis URL") from None
        url = f"redis://{self.host}:{port}/0"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise ClusterError(f"redis-server exited with code {child.proc.returncode} (its log is above)")
            try:
                redis.Redis.from_url(url, socket_timeout=1).ping()
                return url
            except redis.ConnectionError:
                time.sleep(0.05)
        raise ClusterError("redis-server did not answer PING within 30s")

    def first_dead(self) -> Child | None:
        """The first essential child that exited. An expert replica is not essential: the router
        moves its traffic to the other replicas of its shard, and a replacement can join any time."""
        for child in self.children:
            if child.proc.poll() is None or child.reported:
                continue
            if not child.name.startswith("expert-"):
                return child
            print(f"[{child.name}] exited with code {child.proc.returncode}", flush=True)
            child.reported = True
        return None

    def stop(self, grace_s: float = 15.0) -> None:
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.terminate()
        deadline = time.monotonic() + grace_s
        for child in self.children:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()


@dataclass(frozen=True)
class ClusterSpec:
    """What `moemesh up` starts."""

    model: Path
    experts: int = 2
    replicas: int = 1
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str | None = None
    dtype: str = "auto"
    wire_dtype: str = "auto"
    quantize: str = "none"


def up(spec: ClusterSpec) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    common = {"model": spec.model, "host": spec.host, "dtype": spec.dtype, "wire-dtype": spec.wire_dtype}
    expert_flags = common | {"port": 0, "quantize": spec.quantize}
    cluster = Cluster(spec.host)
    with tempfile.TemporaryDirectory(prefix="moemesh-redis-") as redis_dir:
        try:
            redis_url = spec.redis_url
            if not redis_url:
                redis_url = cluster.start_redis(Path(redis_dir))
                print(f"[redis] ready on {redis_url}", flush=True)
            shards = [
                cluster.service(
                    f"expert-{i}.{r}",
                    "expert",
                    expert_flags | {"shard": f"{i}/{spec.experts}", "registry": redis_url},
                )
                for i in range(spec.experts)
                for r in range(spec.replicas)
            ]
            for child in shards:
                child.wait_ready(START_TIMEOUT_S)
            router = cluster.service("router", "router", common | {"registry": redis_url, "port": 0, "metrics-port": 0})
            router_address = router.wait_ready(START_TIMEOUT_S)
            gateway = cluster.service(
                "gateway",
                "gateway",
                common | {"router": router_address, "redis": redis_url, "port": spec.port, "metrics-port": 0},
            )
            print(f"gateway listening on {gateway.wait_ready(START_TIMEOUT_S)}", flush=True)
            while not stop.wait(0.5):
                dead = cluster.first_dead()
                if dead is not None:
                    raise ClusterError(f"{dead.name} exited with code {dead.proc.returncode}; stopping the cluster")
            return 0
        except ClusterError as exc:
            print(f"moemesh up: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            cluster.stop()
