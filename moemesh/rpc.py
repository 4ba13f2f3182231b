"""gRPC plumbing shared by the services: server factory, error mapping, health, multiplexed streams."""

import functools
import inspect
import itertools
import logging
import queue
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moemesh import ports, tls
from moemesh.compute_threads import adopt_torch_threads
from moemesh.errors import ConfigError, MoemeshError, PeerUnreachable, from_status, status_code
from moemesh.v1 import call_pb2

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 512 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]
# Internal channels ping their peer: a hung (e.g. SIGSTOPped) process that the kernel still keeps
# connected breaks the stream within keepalive time + timeout, which fails its pending calls over.
KEEPALIVE_TIME_MS = 2000
KEEPALIVE_TIMEOUT_MS = 2000
INTERNAL_CHANNEL_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A restarted peer is reached again within a second, not after gRPC's default backoff (up to 2 min).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Servers accept those pings instead of answering them with GOAWAY (too_many_pings). gRPC's default
# SO_REUSEPORT would let a second server bind a port already served, and the kernel split the connections
# between the two: a port in use is refused instead (`moemesh.ports`).
SERVER_OPTIONS = CHANNEL_OPTIONS + [
    ("grpc.so_reuseport", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def map_errors(method: Callable) -> Callable:
    """Turns domain errors into their gRPC status and anything else into INTERNAL, without a trace."""

    def abort(context: grpc.ServicerContext, exc: Exception) -> None:
        if isinstance(exc, MoemeshError):
            if getattr(exc, "retry_after_ms", None) is not None:
                context.set_trailing_metadata((("retry-after-ms", str(exc.retry_after_ms)),))
            context.abort(exc.code, str(exc))
        log.exception("unhandled error in %s", method.__qualname__)
        context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - this is the one place errors become statuses
                if context.is_active():  # else the call is over (cancelled, server stopping): nobody to tell
                    abort(context, exc)

        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            abort(context, exc)

    return unary_wrapper


def call_status(exc: Exception) -> call_pb2.CallStatus:
    """The status one call of a multiplexed stream answers with (the stream itself stays open)."""
    if isinstance(exc, MoemeshError):
        return call_pb2.CallStatus(code=exc.code.value[0], message=str(exc))
    log.error("unhandled error in a call", exc_info=exc)
    return call_pb2.CallStatus(code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error: {type(exc).__name__}")


def answer_calls(
    requests: Iterator[Any], handle: Callable[[Any], Any], failed: Callable[[int, call_pb2.CallStatus], Any]
) -> Iterator[Any]:
    """Answers each request of a long-lived stream in turn: `handle(request)` gives the response, and a call
    that raises is answered by `failed(request_id, status)`, so one bad call never ends the others."""
    for request in requests:
        try:
            yield handle(request)
        except Exception as exc:  # noqa: BLE001 - per-call errors become per-call statuses
            yield failed(request.request_id, call_status(exc))


class Background(Protocol):
    """A thread of work that lives as long as a service serves."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class Service:
    """A gRPC server with standard health checking, a ready line, and graceful drain on SIGTERM; TLS with
    `credentials` (`moemesh.tls.Tls.server_credentials`)."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        workers: int = 32,
        credentials: grpc.ServerCredentials | None = None,
        max_receive_bytes: int = MAX_MESSAGE_BYTES,
        interceptors: list[grpc.ServerInterceptor] | None = None,
    ):
        self.name = name
        options = list((dict(SERVER_OPTIONS) | {"grpc.max_receive_message_length": max_receive_bytes}).items())
        # Handlers compute (an expert's matmuls, a router's gates) on the configured torch threads.
        handlers = futures.ThreadPoolExecutor(max_workers=workers, initializer=adopt_torch_threads)
        self.server = grpc.server(handlers, options=options, interceptors=interceptors)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        ports.ensure_free(name, host, port)  # the clear refusal; gRPC's own (a race lost) logs a C-core line first
        try:
            self.port = tls.add_port(self.server, f"{host}:{port}", credentials)
        except RuntimeError as exc:  # "Failed to bind to address ..."
            raise ConfigError(f"{name}: cannot listen on {host}:{port}: {exc}") from None
        self.address = f"{host}:{self.port}"
        self._beside: list[Background] = []

    def run_beside(self, task: Background) -> None:
        """Starts `task` (the gateway's readiness prober), which `stop_beside` stops once serving is done."""
        task.start()
        self._beside.append(task)

    def stop_beside(self) -> None:
        for task in reversed(self._beside):
            task.stop()
        self._beside.clear()

    def start(self, ready: bool = True) -> None:
        """Starts serving; `ready=False`: health checks (and calls) are answered, but the health stays
        NOT_SERVING and the ready line unprinted until `ready()` (an expert loading its shard)."""
        self.server.start()
        if ready:
            self.ready()

    def ready(self) -> None:
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        print(f"{self.name} listening on {self.address}", flush=True)

    def serve_until_signal(self, grace_s: float, before_drain: Callable[[], None] | None = None) -> None:
        """Blocks until SIGTERM/SIGINT, then runs `before_drain` (leave a registry), reports NOT_SERVING,
        and lets in-flight calls finish for up to `grace_s` while refusing new ones."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        if before_drain is not None:
            before_drain()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


class StreamClient:
    """Many concurrent request/response pairs over one long-lived bidirectional stream.

    Requests carry a `request_id`; a reader thread resolves each caller's future from the matching
    response, or fails it alone when the response carries an error status. A broken stream (the
    transport, or the server ending it) fails every pending call with `PeerUnreachable` (UNAVAILABLE)
    and is reopened on next use. TLS with `credentials` (`moemesh.tls.Tls.channel_credentials`).
    """

    _CLOSE = object()

    def __init__(
        self,
        target: str,
        open_stream: Callable[[grpc.Channel], Callable[..., Iterator[Any]]],
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.target = target
        self._channel = tls.open_channel(target, credentials, INTERNAL_CHANNEL_OPTIONS)
        self._method = open_stream(self._channel)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stream: _OpenStream | None = None

    def submit(self, request: Any) -> futures.Future:
        request.request_id = next(self._ids)
        with self._lock:
            if self._stream is None or self._stream.broken:
                self._stream = _OpenStream(self._method, self.target)
            return self._stream.send(request)

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
        self._channel.close()


class _OpenStream:
    def __init__(self, method: Callable[..., Iterator[Any]], target: str):
        self.target = target
        self.broken = False
        self._requests: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: dict[int, futures.Future] = {}
        self._lock = threading.Lock()
        self._responses = method(iter(self._requests.get, StreamClient._CLOSE))
        threading.Thread(target=self._read, name=f"stream-{target}", daemon=True).start()

    def send(self, request: Any) -> futures.Future:
        future: futures.Future = futures.Future()
        with self._lock:
            if self.broken:
                future.set_exception(PeerUnreachable(f"{self.target}: stream closed"))
                return future
            self._pending[request.request_id] = future
        self._requests.put(request)
        return future

    def close(self) -> None:
        self._requests.put(StreamClient._CLOSE)
        self._responses.cancel()

    def _read(self) -> None:
        error: MoemeshError = PeerUnreachable(f"{self.target}: stream ended")
        try:
            for response in self._responses:
                with self._lock:
                    future = self._pending.pop(response.request_id, None)
                if future is None:
                    continue
                if response.status.code:
                    future.set_exception(from_status(status_code(response.status.code), response.status.message))
                else:
                    future.set_result(response)
        except grpc.RpcError as exc:
            error = PeerUnreachable(f"{self.target}: {exc.code().name}: {exc.details()}")
        with self._lock:
            self.broken = True
            pending, self._pending = self._pending, {}
        for future in pending.values():
            future.set_exception(error)
