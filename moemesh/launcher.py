"""`moemesh up`: a whole cluster on loopback (redis-server, N expert shards x R replicas, routers, gateway).

Children start in dependency order; each prints `<role> listening on HOST:PORT` when it can serve, and
`up` prints `[name] ready on ADDRESS`. A child that fails to start ends `up` with its cause and a non-zero
exit. Once the cluster is up, `up` supervises it: an expert replica, router or redis-server (one that `up`
started) that dies is started again with the same command line after a short backoff. Routers and Redis
keep their ports, so the gateway's router list and the Redis URL stay valid; experts take a new port and
announce it in the registry. The gateway's death ends the cluster with a non-zero exit. SIGINT/SIGTERM
stops every child (a terminal's Ctrl-C reaches `up` alone: each child leads a process group of its own). Children
also get SIGTERM from the kernel if this process dies (PR_SET_PDEATHSIG).

Each child's output (its request log included) goes to `<log dir>/<name>.log`, which `up` prints at start; the
terminal gets the ready lines, where and with what each service computes, warnings and errors, so that a
`moemesh chat` in the same terminal is not interleaved with log lines. A gateway port already in use fails
`up` before any child starts.

With TLS every child gets the same certificate, key and CA (`moemesh certs`): the gateway serves TLS, routers
and experts mutual TLS, and redis-server TLS only, asking clients for their certificate too.
"""

import ctypes
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import redis

from moemesh import certs, hardware, ports
from moemesh.errors import ConfigError
from moemesh.tls import PLAINTEXT, Tls

READY = re.compile(r"^(\w+) listening on (\S+)$")
# Besides its own `[name] ready on` lines, `up` shows of its children's stdout where else they listen and what
# they compute with (`moemesh.compute_report`); the rest is in their log files.
SHOWN_STDOUT = re.compile(r"^\w+ (metrics on|compute:) ")
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\w+) ")  # `moemesh.cli`'s logging format
QUIET_LEVELS = frozenset({"DEBUG", "INFO"})
TAIL_LINES = 5  # of a child's log, in the error when it exits before it was ready and showed no error
START_TIMEOUT_S = 300
BACKOFF_MIN_S = 0.5  # first wait before a restart
BACKOFF_MAX_S = 5.0  # the wait doubles up to this while a child keeps dying quickly
STABLE_S = 10.0  # a child that ran at least this long is restarted after the shortest wait again

_prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl  # loaded here, not in the forked child


class ClusterError(Exception):
    """A child failed to start or died; the message names it."""


class Stopping(Exception):
    """The cluster is stopping: no child starts any more."""


@dataclass
class Service:
    """How to start one child, as often as it dies."""

    name: str
    argv: list[str]
    redis_url: str | None = None  # a redis-server, which prints no ready line: ready once it answers PING
    env: dict[str, str] = field(default_factory=dict)  # defaults the environment of `up` overrides


@dataclass
class Child:
    """One run of a service's process; a restart is a new Child. Everything it prints goes to its log file
    (`log`); the terminal gets what `shown_on_stdout` and `ErrorFilter` let through."""

    name: str
    proc: subprocess.Popen
    log: TextIO
    started: float = field(default_factory=time.monotonic)
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    shown_errors: int = 0  # lines of its stderr shown on the terminal
    _log_lock: threading.Lock = field(default_factory=threading.Lock)
    _errors_read: threading.Event = field(default_factory=threading.Event)
    output_done: threading.Event = field(default_factory=threading.Event)  # both streams read, the log closed

    def _write_log(self, line: str) -> None:
        with self._log_lock:
            self.log.write(line)
            self.log.flush()

    def pump_output(self) -> None:
        """Logs the child's stdout, catches its ready line, and shows its address and compute lines."""
        for line in self.proc.stdout:
            self._write_log(line)
            match = READY.match(line.strip())
            if match and not self.ready.is_set():
                self.address = match.group(2)
                self.ready.set()
            elif SHOWN_STDOUT.match(line):
                print(f"[{self.name}] {line}", end="", flush=True)
        self._errors_read.wait()
        self.log.close()
        self.ready.set()  # exited: wake whoever waits for it
        self.output_done.set()

    def pump_errors(self) -> None:
        """Logs the child's stderr and shows its warnings and errors."""
        shown = ErrorFilter()
        for line in self.proc.stderr:
            self._write_log(line)
            if shown(line):
                self.shown_errors += 1
                print(f"[{self.name}] {line}", end="", file=sys.stderr, flush=True)
        self._errors_read.set()

    def wait_ready(self, timeout_s: float, stopping: threading.Event) -> str:
        """Its address once its ready line came; `Stopping` as soon as the cluster stops (a Ctrl-C reaches `up`
        alone, and must not wait for a service still loading)."""
        deadline = time.monotonic() + timeout_s
        while not self.ready.wait(0.1):
            if stopping.is_set():
                raise Stopping
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} did not become ready within {timeout_s:g}s")
        if self.address is None:
            raise self.exited_early()
        return self.address

    def wait_redis(self, url: str, tls: Tls, timeout_s: float, stopping: threading.Event) -> str:
        """Ready once it answers PING, which it does only after replaying its AOF."""
        deadline = time.monotonic() + timeout_s
        with tls.redis(url, socket_timeout=1) as client:
            while time.monotonic() < deadline:
                if stopping.is_set():
                    raise Stopping
                if self.proc.poll() is not None:
                    raise self.exited_early()
                try:
                    client.ping()
                    self.address = url
                    return url
                except (redis.ConnectionError, redis.TimeoutError):  # BusyLoadingError (AOF replay) is one too
                    time.sleep(0.05)
        raise ClusterError(f"{self.name} did not answer PING within {timeout_s:g}s")

    def exited_early(self) -> ClusterError:
        code = self.proc.wait()
        log = Path(self.log.name)
        self._errors_read.wait(1.0)  # every error line it printed has been shown (or not) by now
        if self.shown_errors:  # its errors are on the terminal already
            return ClusterError(f"{self.name} exited with code {code} before it was ready (its log: {log})")
        self.ready.wait(1.0)  # its last lines are in the log once its stdout is read to the end
        tail = "".join(f"  {line}\n" for line in log.read_text(errors="replace").splitlines()[-TAIL_LINES:])
        return ClusterError(f"{self.name} exited with code {code} before it was ready; the end of {log}:\n{tail}")


class ErrorFilter:
    """Which lines of a child's stderr the terminal shows: log records of WARNING and above with the indented
    lines that follow them (a traceback), and anything printed outside logging (a crash's traceback, the one
    line a command that refuses its settings prints); not INFO records and their indented lines, and not the
    request log's JSON lines."""

    def __init__(self) -> None:
        self.showing = True

    def __call__(self, line: str) -> bool:
        if record := LOG_RECORD.match(line):
            self.showing = record.group(1) not in QUIET_LEVELS
        elif line.startswith("{"):  # `moemesh.requests`: one JSON object a line
            return False
        elif not line[:1].isspace():
            self.showing = True
        return self.showing


def default_log_dir() -> Path:
    """A new folder for one run's logs under the user's state directory (XDG_STATE_HOME, ~/.local/state)."""
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "moemesh" / "logs" / f"up-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def die_with_parent() -> None:
    """In a child before exec: SIGTERM when the thread that forked it ends (PR_SET_PDEATHSIG)."""
    _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# The gateway's threads run a step's many small ops back to back: a thread that sleeps as soon as one
# ends (OMP_WAIT_POLICY=PASSIVE) is woken for the next at a cost (a demo-model decode step in one process:
# 14.2 ms against 8.6 ms spinning). A short spin (libgomp's count; torch's CPU wheels use libgomp) keeps
# them awake between ops but not through the waits for the experts: under `up`, 44 against 34-39 tok/s at
# 1 stream, 194-214 against 184-191 at 8, where a spin of 100,000 was slower than none (docs/benchmarks.md).
GATEWAY_ENV = {"GOMP_SPINCOUNT": "20000"}


def _service(name: str, role: str, flags: dict[str, object], env: dict[str, str] | None = None) -> Service:
    argv = [sys.executable, "-m", "moemesh.cli", role]
    for flag, value in flags.items():
        if value is not None:
            argv += [f"--{flag}", str(value)]
    return Service(name, argv, env=env or {})


def _redis_service(host: str, data_dir: Path, tls: Tls) -> Service:
    """A redis-server on a fixed port whose AOF (fsynced at every write, so nothing acknowledged is lost to
    a kill -9) lives in `data_dir`: a restart comes back at the same URL with the same data."""
    port = _free_port(host)
    argv = ["redis-server", "--bind", host, "--dir", str(data_dir), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--protected-mode", "no"]  # fmt: skip
    if tls.cert is None:
        return Service("redis", argv + ["--port", str(port)], redis_url=f"redis://{host}:{port}/0")
    argv += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert), "--tls-key-file",
             str(tls.key), "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "yes"]  # fmt: skip
    return Service("redis", argv, redis_url=f"rediss://{host}:{port}/0")


class Cluster:
    """The children of `moemesh up`: starts them, restarts the supervised ones, stops them all."""

    def __init__(self, log_dir: Path, tls: Tls = PLAINTEXT):
        self.log_dir = log_dir  # `<name>.log` of each service, every run of it appended
        self.tls = tls  # what `up` connects to its redis-server with
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # no child starts once stop() has taken the list of children
        self._children: dict[str, Child] = {}  # the current run of each service, in start order
        self._stores: set[str] = set()  # the redis-servers among them, stopped last

    def spawn(self, service: Service) -> Child:
        # Each child leads a process group of its own: a Ctrl-C in the terminal reaches `up` alone, which stops
        # the services before their redis-server. They stay in the session of `up`.
        # Services take turns on the same cores (the gateway waits while the experts compute): OpenMP
        # threads that spin while idle would steal the cores the other services need.
        env = {"OMP_WAIT_POLICY": "PASSIVE"} | service.env | dict(os.environ)
        with self._lock:
            if self.stopping.is_set():
                raise Stopping
            log = open(self.log_dir / f"{service.name}.log", "a")  # noqa: SIM115 - open as long as the child
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(service.argv)}\n")
            log.flush()
            try:
                proc = subprocess.Popen(
                    service.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                    text=True, bufsize=1, env=env, preexec_fn=die_with_parent, process_group=0,
                )  # fmt: skip
            except OSError:
                log.close()
                raise
            child = self._children[service.name] = Child(service.name, proc, log)
            if service.redis_url:
                self._stores.add(service.name)
        threading.Thread(target=child.pump_output, name=f"out-{service.name}", daemon=True).start()
        threading.Thread(target=child.pump_errors, name=f"err-{service.name}", daemon=True).start()
        return child

    def wait_ready(self, service: Service, child: Child, timeout_s: float = START_TIMEOUT_S) -> None:
        try:
            if service.redis_url:
                child.wait_redis(service.redis_url, self.tls, timeout_s, self.stopping)
            else:
                child.wait_ready(timeout_s, self.stopping)
        except ClusterError:
            if self.stopping.is_set():  # stopping: a child that exits now is no failure
                raise Stopping from None
            raise
        print(f"[{service.name}] ready on {child.address}", flush=True)

    def start(self, service: Service) -> Child:
        child = self.spawn(service)
        self.wait_ready(service, child)
        return child

    def supervise(self, service: Service) -> None:
        """Restarts `service` whenever it dies, until the cluster stops, from a thread of its own that lives
        as long: PR_SET_PDEATHSIG fires when the *thread* that forked a child ends, not the process."""
        child = self._children[service.name]
        threading.Thread(
            target=self._keep_alive, args=(service, child), name=f"supervise-{service.name}", daemon=True
        ).start()

    def _keep_alive(self, service: Service, child: Child) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            code = child.proc.wait()
            if self.stopping.is_set():
                return
            if time.monotonic() - child.started >= STABLE_S:
                backoff = BACKOFF_MIN_S
            print(f"[{service.name}] exited with code {code}; restarting", flush=True)
            if self.stopping.wait(backoff):
                return
            backoff = min(2 * backoff, BACKOFF_MAX_S)
            try:
                child = self.spawn(service)
                self.wait_ready(service, child)
            except Stopping:
                return
            except (ClusterError, OSError) as exc:  # it died, hung or could not start: the next turn retries
                print(f"[{service.name}] {exc}", flush=True)
                child.proc.kill()

    def stop(self, grace_s: float = 15.0) -> None:
        """Stops every child, the last started first, and redis-server once the services that use it have
        exited (they leave the registry as they drain); none starts or restarts after this."""
        with self._lock:
            self.stopping.set()
            children = list(self._children.values())
        deadline = time.monotonic() + grace_s
        services = [child for child in children if child.name not in self._stores]
        for group in (services, [child for child in children if child.name in self._stores]):
            for child in reversed(group):
                if child.proc.poll() is None:
                    child.proc.terminate()
            for child in group:
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait()
        for child in children:  # their last lines logged and shown
            child.output_done.wait(2.0)


@dataclass(frozen=True)
class ClusterSpec:
    """What `moemesh up` starts."""

    model: Path
    experts: int = 2
    replicas: int = 1
    routers: int = 1  # 0: the gateway routes itself (calls the expert shards directly)
    host: str = "127.0.0.1"
    port: int = 50051
    redis_url: str | None = None
    device: str = "auto"  # every service's --device
    dtype: str = "auto"
    wire_dtype: str = "auto"
    quantize: str = "none"
    quantized_kernels: str = "fast"  # every service's --quantized-kernels
    tls: bool = False
    certs: Path | None = None  # with tls: the certificates' directory (made there if empty); None: a temporary one
    threads: int = 0  # torch threads of each service; 0: see `service_threads` and `gateway_threads`
    log_dir: Path | None = None  # each service's log file; None: `default_log_dir()`

    def service_threads(self) -> int:
        """The shards' replicas compute side by side and the routers while they wait, so the cores are shared
        out among the replicas: on 2 cores with 2 shards, 1 thread each gave 271 tok/s at 16 streams against
        214 with 2 threads each (docs/benchmarks.md), as threads beyond a free core only wait."""
        return self.threads or max(1, hardware.available_cores() // (self.experts * self.replicas))

    def thread_plan(self) -> str:
        """The line `up` prints on how it shares out the cores (each service prints its count again)."""
        if self.threads:
            return f"threads: {self.threads} for every service (--threads)"
        return (
            f"cores: {hardware.describe_cores()}; torch threads: gateway {self.gateway_threads()}, each of the "
            f"{self.experts * self.replicas} expert replicas and each router {self.service_threads()}"
        )

    def gateway_threads(self) -> int:
        """The gateway gets every core: its largest matmuls (the LM head, read whole at every step) are
        bandwidth-bound and run while the expert shards wait for the step's last layer (docs/benchmarks.md). Small
        steps still compute on one of them (`GatewaySettings.one_thread_step_tokens`)."""
        return self.threads or hardware.available_cores()


def _start_group(cluster: Cluster, services: list[Service]) -> list[Child]:
    """Starts the services side by side and waits until every one is ready."""
    children = [cluster.spawn(s) for s in services]
    for service, child in zip(services, children):
        cluster.wait_ready(service, child)
    return children


def _start(cluster: Cluster, spec: ClusterSpec, redis_dir: Path) -> tuple[Child, list[Service]]:
    """Starts every child in dependency order; returns the gateway and the services to supervise."""
    tls = cluster.tls
    common = {"model": spec.model, "host": spec.host, "device": spec.device, "dtype": spec.dtype,
              "wire-dtype": spec.wire_dtype, "quantized-kernels": spec.quantized_kernels,
              "threads": spec.service_threads(), "tls-cert": tls.cert,
              "tls-key": tls.key, "tls-ca": tls.ca}  # fmt: skip
    supervised = []
    redis_url = spec.redis_url
    if not redis_url:
        service = _redis_service(spec.host, redis_dir, tls)
        try:
            redis_url = cluster.start(service).address
        except FileNotFoundError:
            raise ClusterError("redis-server not found: run `make install` or pass --redis URL") from None
        supervised.append(service)
    expert_flags = common | {"port": 0, "quantize": spec.quantize, "registry": redis_url, "metrics-port": 0}
    experts = [
        _service(f"expert-{i}.{r}", "expert", expert_flags | {"shard": f"{i}/{spec.experts}"})
        for i in range(spec.experts)
        for r in range(spec.replicas)
    ]
    _start_group(cluster, experts)
    router_flags = common | {"registry": redis_url, "metrics-port": 0}
    # A fixed port each, so that a restarted router comes back where the gateway looks for it.
    routers = [
        _service(f"router-{i}", "router", router_flags | {"port": _free_port(spec.host)}) for i in range(spec.routers)
    ]
    router_addresses = ",".join(child.address for child in _start_group(cluster, routers))
    experts_at = {"router": router_addresses} if routers else {"registry": redis_url}  # no routers: it routes itself
    gateway_flags = experts_at | {"redis": redis_url, "port": spec.port, "metrics-port": 0, "quantize": spec.quantize,
                                  "threads": spec.gateway_threads()}  # fmt: skip
    gateway = cluster.start(_service("gateway", "gateway", common | gateway_flags, GATEWAY_ENV))
    return gateway, supervised + experts + routers


def _stop_on_signals(stopping: threading.Event) -> None:
    """SIGINT/SIGTERM set `stopping`, from a thread: a Python signal handler runs in the main thread between
    any two bytecodes, and one that took a lock (Event.set does) could wait forever on the main thread."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd)  # the interpreter writes each signal's number here
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)

    def watch() -> None:
        os.read(read_fd, 1)
        stopping.set()

    threading.Thread(target=watch, name="signals", daemon=True).start()


def _cluster_tls(spec: ClusterSpec, scratch: Path) -> Tls:
    """No TLS, or the certificates in `spec.certs` (made there if it has none) or made in `scratch`; prints
    where the CA's certificate is, for clients."""
    if not spec.tls:
        return PLAINTEXT
    files = certs.ensure(spec.certs or scratch / "certs")
    print(f"TLS CA certificate at {files.ca}", flush=True)
    return Tls.load(files.cert, files.key, files.ca)


def _check_port(host: str, port: int) -> None:
    """A gateway port that something already listens on fails `up` before any child starts (the gateway would
    refuse it too, but only once the experts had loaded)."""
    try:
        ports.ensure_free("gateway", host, port)
    except ConfigError as exc:
        raise ClusterError(str(exc)) from None


def up(spec: ClusterSpec) -> int:
    log_dir = spec.log_dir or default_log_dir()
    try:
        _check_port(spec.host, spec.port)
        log_dir.mkdir(parents=True, exist_ok=True)
    except (ClusterError, OSError) as exc:
        print(f"moemesh up: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"logs in {log_dir}", flush=True)
    print(spec.thread_plan(), flush=True)
    with tempfile.TemporaryDirectory(prefix="moemesh-up-") as scratch:
        cluster = Cluster(log_dir, _cluster_tls(spec, Path(scratch)))
        _stop_on_signals(cluster.stopping)
        redis_dir = Path(scratch) / "redis"
        redis_dir.mkdir()
        try:
            gateway, supervised = _start(cluster, spec, redis_dir)
            print(f"gateway listening on {gateway.address}", flush=True)
            for service in supervised:
                cluster.supervise(service)
            while not cluster.stopping.wait(0.5):
                if gateway.proc.poll() is not None:
                    raise ClusterError(f"gateway exited with code {gateway.proc.returncode}; stopping the cluster")
            return 0
        except Stopping:  # SIGINT/SIGTERM while starting
            return 0
        except ClusterError as exc:
            print(f"moemesh up: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            cluster.stop()
