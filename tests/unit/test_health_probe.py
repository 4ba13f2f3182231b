"""`moemesh health ADDR`: a grpc.health.v1 probe against a real in-process server (exit 0 only for SERVING)."""

from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from moemesh import certs
from moemesh.cli import main
from moemesh.tls import Tls, add_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start_server(credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.Server, health.HealthServicer, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = add_port(server, "127.0.0.1:0", credentials)
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


@pytest.fixture
def plaintext():
    server, servicer, address = start_server()
    servicer.set("", SERVING)
    servicer.set("moemesh.v1.Gateway", NOT_SERVING)
    yield address
    server.stop(None)


@pytest.mark.timeout(30)
def test_serving_exits_0_and_prints_the_status(plaintext, capsys):
    assert main(["health", plaintext]) == 0
    assert capsys.readouterr().out == "SERVING\n"


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("service", "printed"), [("moemesh.v1.Gateway", "NOT_SERVING"), ("moemesh.v1.Nothing", "NOT_FOUND")]
)
def test_anything_else_exits_1(plaintext, capsys, service, printed):
    assert main(["health", plaintext, "--service", service]) == 1
    assert capsys.readouterr().out == f"{printed}\n"


@pytest.mark.timeout(30)
def test_no_answer_within_the_timeout_exits_1(capsys):
    server, _, address = start_server()
    server.stop(None)  # the port is closed now
    assert main(["health", address, "--timeout", "0.5"]) == 1
    assert capsys.readouterr().out.startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED"))


@pytest.mark.timeout(30)
def test_mutual_tls(tmp_path, capsys):
    files = certs.make(tmp_path / "certs")
    tls = Tls.load(files.cert, files.key, files.ca)
    server, servicer, address = start_server(tls.server_credentials(require_client_auth=True))
    servicer.set("", SERVING)
    try:
        flags = ["--tls-ca", str(files.ca), "--tls-cert", str(files.cert), "--tls-key", str(files.key)]
        assert main(["health", address, *flags]) == 0
        assert main(["health", address, "--tls-ca", str(files.ca), "--timeout", "2"]) == 1  # no client certificate
        assert main(["health", address, "--tls-cert", str(files.cert), "--tls-key", str(files.key)]) == 2  # no CA
    finally:
        server.stop(None)
    assert capsys.readouterr().out.splitlines()[0] == "SERVING"
