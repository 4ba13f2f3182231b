"""The gateway's readiness: health service `moemesh.v1.Gateway` is SERVING only while the engine thread runs
and, with routers, at least one router answers a health check within `PROBE_DEADLINE_S`.

Health service `""` is the process's liveness: SERVING from start to drain, whatever its dependencies do.
Kubernetes: a liveness probe on `""`, a readiness probe on `moemesh.v1.Gateway` (README: Observability).
"""

import logging
import threading

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.tls import open_channel
from services.gateway.engine import Engine

log = logging.getLogger(__name__)

READINESS = "moemesh.v1.Gateway"
PROBE_INTERVAL_S = 0.25
PROBE_DEADLINE_S = 1.0


class Readiness:
    """A background prober that keeps `READINESS` in `servicer` equal to the dependencies' state."""

    def __init__(
        self,
        servicer: health.HealthServicer,
        engine: Engine,
        routers: list[str],
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.servicer, self.engine = servicer, engine
        self._channels = [open_channel(a, credentials, CHANNEL_OPTIONS) for a in routers]
        self._stubs = [health_pb2_grpc.HealthStub(c) for c in self._channels]
        self._stop = threading.Event()
        self._serving: bool | None = None
        self.servicer.set(READINESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._thread = threading.Thread(target=self._run, name="readiness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        for channel in self._channels:
            channel.close()

    def check(self) -> tuple[bool, str]:
        """(ready, why not)."""
        if not self.engine.alive:
            return False, "the engine thread is not running"
        if self._stubs and not self._a_router_answers():
            return False, f"no router answered a health check within {PROBE_DEADLINE_S:g}s"
        return True, ""

    def _a_router_answers(self) -> bool:
        request = health_pb2.HealthCheckRequest(service="")
        calls = [stub.Check.future(request, timeout=PROBE_DEADLINE_S) for stub in self._stubs]
        try:  # sent together: waiting for them in turn takes the deadline at most
            for call in calls:
                try:
                    if call.result().status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.RpcError:
                    continue
            return False
        finally:
            for call in calls:
                call.cancel()

    def _run(self) -> None:
        while True:
            ready, why = self.check()
            if ready != self._serving:
                if ready:
                    log.info("ready: dependencies answer")
                elif self._serving is None:  # the first check, made before the engine starts: no news
                    log.info("not ready yet: %s", why)
                else:
                    log.warning("not ready: %s", why)
                self._serving = ready
                status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
                self.servicer.set(READINESS, status)  # ignored once the server drains
            if self._stop.wait(PROBE_INTERVAL_S):
                return
