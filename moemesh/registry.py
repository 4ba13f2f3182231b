"""Expert replicas announce themselves in Redis with a heartbeat TTL; routers watch the announcements.

Key `moemesh:experts:{address}`, value JSON {fingerprint, layers: {layer: [experts]}}, expiring
`ttl_s` after the last heartbeat: a replica that dies drops out by itself within `ttl_s`.
"""

import json
import logging
import socket
import threading

import redis

from moemesh.telemetry import REDIS_ERRORS

log = logging.getLogger(__name__)

PREFIX = "moemesh:experts:"
WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def advertised_address(host: str, port: int) -> str:
    """Where routers reach a replica bound to `host:port` that was given no `--advertise`: `host:port`, or for
    a wildcard bind (a container's 0.0.0.0) the address the machine's own host name resolves to, which in a
    container (Docker, Kubernetes) is its own IP, distinct for every replica of a scaled service."""
    if host in WILDCARDS:
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


class Registration:
    """Keeps one replica's announcement alive until `stop()`, which withdraws it."""

    def __init__(self, client: redis.Redis, address: str, info: dict, ttl_s: float = 3.0):
        self.client, self.key, self.value, self.ttl_s = client, PREFIX + address, json.dumps(info), ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="registry-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.client.delete(self.key)
        except redis.RedisError as exc:
            log.warning("could not withdraw %s from the registry: %s", self.key, exc)

    def _beat(self) -> None:
        while True:
            try:
                self.client.set(self.key, self.value, px=int(self.ttl_s * 1000))
            except redis.RedisError as exc:  # Redis away: retry; routers keep the replica meanwhile
                REDIS_ERRORS.labels(service="expert", op="heartbeat").inc()  # metrics
                log.warning("registry heartbeat failed: %s", exc)
            if self._stop.wait(self.ttl_s / 3):
                return


def announced(client: redis.Redis) -> dict[str, dict]:
    """Every live announcement: address -> info."""
    keys = list(client.scan_iter(match=PREFIX + "*", count=1000))
    values = client.mget(keys) if keys else []
    return {k.decode().removeprefix(PREFIX): json.loads(v) for k, v in zip(keys, values) if v is not None}
