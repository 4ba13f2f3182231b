"""Prometheus metrics endpoint shared by the services, and the metrics every service shares."""

from prometheus_client import Counter, start_http_server

from moemesh import ports
from moemesh.errors import ConfigError

# Redis calls that failed (connection refused or dropped, timeout), by service and operation. Labels are
# fixed strings: the service's role and the operation's name in the code, never a key or a session id.
REDIS_ERRORS = Counter("moemesh_redis_errors", "Redis operations that failed", ["service", "op"])


def serve_metrics(name: str, host: str, port: int) -> None:
    """Serves /metrics when `port` >= 0 (0: a free port) and prints where."""
    if port < 0:
        return
    ports.ensure_free(f"{name} metrics", host, port)
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:  # a race lost since the check
        raise ConfigError(f"{name} metrics: cannot listen on {host}:{port}: {exc.strerror}") from None
    print(f"{name} metrics on {host}:{server.server_port}", flush=True)
