"""Prometheus metrics endpoint shared by the services."""

from prometheus_client import start_http_server


def serve_metrics(name: str, host: str, port: int) -> None:
    """Serves /metrics when `port` >= 0 (0: a free port) and prints where."""
    if port < 0:
        return
    server, _ = start_http_server(port, addr=host)
    print(f"{name} metrics on {host}:{server.server_port}", flush=True)
