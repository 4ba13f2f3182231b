"""A port already in use is refused with one line naming it, by gRPC servers and metrics endpoints alike;
`moemesh up` shows its children's warnings and errors, and keeps their info lines and request log in files."""

import socket

import pytest

from moemesh.errors import ConfigError
from moemesh.launcher import ErrorFilter
from moemesh.rpc import Service
from moemesh.telemetry import serve_metrics

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def held_port():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        yield listener.getsockname()[1]


def test_a_grpc_server_refuses_a_port_another_server_holds():
    first = Service("router", "127.0.0.1", 0)
    first.start()
    try:
        with pytest.raises(ConfigError, match=rf"^router: port {first.port} on 127.0.0.1 is already in use"):
            Service("router", "127.0.0.1", first.port)
    finally:
        first.server.stop(None)


def test_a_grpc_server_refuses_a_port_any_socket_listens_on(held_port):
    with pytest.raises(ConfigError, match=rf"gateway: port {held_port} on 127.0.0.1 is already in use"):
        Service("gateway", "127.0.0.1", held_port)


def test_a_free_port_of_a_stopped_server_is_taken_again():
    first = Service("router", "127.0.0.1", 0)
    first.start()
    first.server.stop(None).wait()
    second = Service("router", "127.0.0.1", first.port)  # a restarted router comes back on its port
    assert second.port == first.port


def test_the_metrics_endpoint_refuses_a_held_port(held_port):
    with pytest.raises(ConfigError, match=rf"^expert metrics: port {held_port} on 127.0.0.1 is already in use"):
        serve_metrics("expert", "127.0.0.1", held_port)


def test_up_shows_warnings_errors_and_tracebacks_but_not_info_or_the_request_log():
    shown = ErrorFilter()
    lines = {
        "2026-12-08 00:03:47,348 INFO services.gateway.health: ready\n": False,
        "  an INFO record's second line\n": False,
        '{"trace_id":"","key_id":"anonymous","method":"Chat","code":"OK"}\n': False,
        "2026-12-08 00:03:47,349 WARNING services.router.placement: registry unavailable\n": True,
        "2026-12-08 00:03:47,350 ERROR moemesh.rpc: unhandled error in Forward\n": True,
        "Traceback (most recent call last):\n": True,
        '  File "x.py", line 1, in <module>\n': True,
        "2026-12-08 00:03:47,351 INFO moemesh: after it\n": False,
        "moemesh expert: port 5 on 127.0.0.1 is already in use\n": True,
    }
    assert {line: shown(line) for line in lines} == lines
