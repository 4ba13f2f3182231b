"""`moemesh health ADDR`: one grpc.health.v1 Check, for container healthchecks and exec probes.

Exit 0 when the service answers SERVING, 1 otherwise (another status, an unknown service, no answer in time),
so `moemesh health` works as a Docker HEALTHCHECK or a Kubernetes exec probe where the native gRPC probe cannot
be used (it speaks no TLS: routers and experts with mutual TLS need `--tls-ca --tls-cert --tls-key`).
"""

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh.errors import ConfigError
from moemesh.tls import PLAINTEXT, Tls, open_channel


def check(address: str, service: str = "", timeout_s: float = 5.0, tls: Tls = PLAINTEXT) -> str:
    """The status's name (`SERVING`, `NOT_SERVING`, ...), or the gRPC code and details when the call failed."""
    with open_channel(address, tls.channel_credentials(), []) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}" if exc.details() else exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def run_health(
    address: str, service: str, timeout_s: float, ca: Path | None, cert: Path | None, key: Path | None
) -> int:
    if (cert is None) != (key is None) or (cert is not None and ca is None):
        raise ConfigError("--tls-cert and --tls-key go together, and with --tls-ca (mutual TLS)")
    status = check(address, service, timeout_s, Tls.load(cert, key, ca))
    print(status)
    return 0 if status == "SERVING" else 1
