"""Where each (layer, expert) lives: a live table of expert replicas, changed while traffic flows.

Replicas come from a static address list and, with a registry, from the announcements in Redis:
one that joins takes traffic at the next poll, one that leaves or stops answering gets none. Each
call goes to the holder of the expert expected to answer first (`moemesh.peers.Chooser`: calls in
flight x recent latency), so a slow replica gets little traffic until it recovers, and a replica
that failed is skipped for a while unless it is the only holder.
"""

import logging
import threading
import time

import grpc
import redis
from prometheus_client import Counter, Histogram

from moemesh import registry
from moemesh.errors import CheckpointError, Unavailable
from moemesh.peers import Chooser, Peer
from moemesh.rpc import CHANNEL_OPTIONS, StreamClient
from moemesh.telemetry import REDIS_ERRORS
from moemesh.tls import open_channel
from moemesh.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)


# Metrics (README: Observability); `replica` is a replica's address, from configuration or the registry.
REPLICA_CALL_SECONDS = Histogram(
    "moemesh_router_replica_call_seconds", "Time from sending a call to an expert replica to its answer or failure",
    ["replica"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)  # fmt: skip
REPLICA_FAILURES = Counter(
    "moemesh_router_replica_failures", "Calls to an expert replica that failed (unreachable, error status)", ["replica"]
)


class ExpertReplica(Peer):
    """An expert service replica and the (layer, expert) pairs it holds."""

    def __init__(self, client: StreamClient, held: set[tuple[int, int]], hedge_floor_s: float):
        super().__init__(client, hedge_floor_s, initial_budget_s=10 * hedge_floor_s)
        self.held = held
        self._seconds, self._failures = REPLICA_CALL_SECONDS.labels(self.address), REPLICA_FAILURES.labels(self.address)

    def observe(self, seconds: float, error: BaseException | None) -> None:
        self._seconds.observe(seconds)
        if error is not None:
            self._failures.inc()

    @classmethod
    def connect(
        cls,
        address: str,
        fingerprint: str,
        timeout_s: float,
        hedge_floor_s: float,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> "ExpertReplica":
        with open_channel(address, credentials, CHANNEL_OPTIONS) as channel:
            try:
                info = expert_pb2_grpc.ExpertStub(channel).Describe(
                    expert_pb2.DescribeExpertRequest(), timeout=timeout_s
                )
            except grpc.RpcError as exc:
                raise Unavailable(f"expert {address}: {exc.code().name}: {exc.details()}") from None
        if info.model_fingerprint != fingerprint:
            raise CheckpointError(
                f"expert {address} serves model {info.model_fingerprint}, this router {fingerprint}: refused"
            )
        held = {(entry.layer, e) for entry in info.layers for e in entry.experts}
        client = StreamClient(address, lambda ch: expert_pb2_grpc.ExpertStub(ch).Forward, credentials)
        return cls(client, held, hedge_floor_s)


class Placement:
    def __init__(
        self,
        layers: tuple[int, ...],
        num_experts: int,
        fingerprint: str,
        connect_timeout_s: float,
        hedge_floor_s: float,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        self.layers, self.num_experts = layers, num_experts
        self.fingerprint, self.connect_timeout_s, self.hedge_floor_s = fingerprint, connect_timeout_s, hedge_floor_s
        self.credentials = credentials  # TLS to the replicas (None: plaintext)
        self._replicas: dict[str, ExpertReplica] = {}
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._chooser = Chooser()

    def add(self, address: str) -> None:
        """Connects to a replica and starts sending it traffic; a replica of another model is refused."""
        if address in self._replicas or address in self._refused:
            return
        try:
            replica = ExpertReplica.connect(
                address, self.fingerprint, self.connect_timeout_s, self.hedge_floor_s, self.credentials
            )
        except CheckpointError as exc:
            self._refused.add(address)
            log.warning("%s", exc)
            return
        except Unavailable as exc:  # not up yet, or gone again: the next sync retries
            log.warning("%s", exc)
            return
        with self._lock:
            self._replicas[address] = replica
        log.info("expert replica %s joined (%d experts)", address, len(replica.held))

    def remove(self, address: str) -> None:
        with self._lock:
            replica = self._replicas.pop(address, None)
        if replica is not None:
            log.info("expert replica %s left", address)
            replica.client.close()

    def missing(self) -> list[tuple[int, int]]:
        with self._lock:
            held = set().union(*(r.held for r in self._replicas.values()))
        return [(layer, e) for layer in self.layers for e in range(self.num_experts) if (layer, e) not in held]

    def pick(self, layer: int, expert: int, excluded: set[Peer]) -> ExpertReplica:
        """The replica holding the expert that is expected to answer first, other than `excluded`."""
        with self._lock:
            holders = [r for r in self._replicas.values() if (layer, expert) in r.held and r not in excluded]
        if not holders:
            raise Unavailable(f"no live expert replica holds layer {layer} expert {expert}")
        return self._chooser.choose(holders)

    def replicas(self) -> list[ExpertReplica]:
        with self._lock:
            return list(self._replicas.values())

    def close(self) -> None:
        for replica in self.replicas():
            replica.client.close()


class Discovery:
    """Polls the registry and keeps the placement equal to the announced replicas of this model.

    A replica leaves the table once its announcement has been absent from `absent_grace_s` of
    successful polls, not at the first: a Redis that restarted (announcements expired while it was
    down) is announced to again within a heartbeat, and its replicas must not vanish meanwhile.
    """

    def __init__(
        self,
        placement: Placement,
        client: redis.Redis,
        static: list[str],
        interval_s: float = 0.5,
        absent_grace_s: float = 2.0,
    ):
        self.placement, self.client, self.static, self.interval_s = placement, client, set(static), interval_s
        self.absent_grace_s = absent_grace_s
        self._absent_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name="discovery", daemon=True)

    def start(self) -> None:
        self.sync()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sync(self) -> None:
        try:
            live = registry.announced(self.client)
        except redis.RedisError as exc:  # keep the table as it is until Redis answers again
            REDIS_ERRORS.labels(service="router", op="registry_poll").inc()  # metrics
            log.warning("registry unavailable: %s", exc)
            return
        now = time.monotonic()
        for address in live:
            self._absent_since.pop(address, None)
            self.placement.add(address)
        for replica in self.placement.replicas():
            if replica.address in live or replica.address in self.static:
                continue
            since = self._absent_since.setdefault(replica.address, now)
            if now - since >= self.absent_grace_s:
                del self._absent_since[replica.address]
                self.placement.remove(replica.address)

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sync()
