"""`moemesh up`: ready line, clean shutdown of every child, clear failure when a child cannot start, and
supervision: a killed expert replica, router or redis-server comes back (routers and Redis at their address)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moemesh import launcher
from moemesh.v1 import gateway_pb2
from tests.helpers import Cluster, UpProcess, session_alive

pytestmark = pytest.mark.integration

REQUEST = gateway_pb2.GenerateRequest(
    prompt_token_ids=[5, 6, 7, 8], sampling=gateway_pb2.SamplingParams(max_new_tokens=6)
)


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_no_child(mixtral_window_dir, sig):
    up = UpProcess(mixtral_window_dir, "--experts", "2", "--replicas", "2", "--routers", "2")
    try:
        up.wait_for(r"^gateway listening on 127\.0\.0\.1:\d+$")
        children = children_of(up.proc.pid)
        assert len(children) == 1 + 4 + 2 + 1  # redis, 2 shards x 2 replicas, 2 routers, gateway
        for name in ("expert-0.0", "expert-1.1", "router-1", "gateway"):  # what each computes with, shown
            up.wait_for(rf"^\[{name}\] \w+ compute: device cpu, dtype \w+ \(.+\), weights .+; kernels: ", 5)
        up.proc.send_signal(sig)
        assert up.proc.wait(60) == 0
    finally:
        up.stop()
    assert not up.session_alive(), "a child of moemesh up outlived it"


@pytest.mark.timeout(120)
def test_a_signal_while_a_service_loads_stops_up_at_once(mixtral_window_dir):
    """A Ctrl-C reaches `up` alone (its children lead process groups of their own): `up` must not wait for a
    service that is still loading (here an expert told to wait 300 s before loading) before it stops them all."""
    up = UpProcess(mixtral_window_dir, "--experts", "1", env=os.environ | {"MOEMESH_FAULT_LOAD_DELAY_S": "300"})
    try:
        up.wait_for(r"^\[expert-0\.0\] expert metrics on ", 60)
        began = time.monotonic()
        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(60) == 0
        assert time.monotonic() - began < 20
    finally:
        up.stop()
    assert not up.session_alive()


@pytest.mark.timeout(60)
def test_up_refuses_a_gateway_port_in_use_before_starting_anything(mixtral_window_dir, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        up = subprocess.Popen(
            [sys.executable, "-m", "moemesh.cli", "up", "--model", str(mixtral_window_dir), "--port", str(port),
             "--log-dir", str(tmp_path / "logs")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )  # fmt: skip
        out, err = up.communicate(timeout=50)
    assert up.returncode == 1
    assert err.strip().splitlines() == [
        f"moemesh up: gateway: port {port} on 127.0.0.1 is already in use (another moemesh up?); "
        "choose another port, or 0 for a free one"
    ]
    assert out == "" and not (tmp_path / "logs").exists()
    assert not session_alive(up.pid)


@pytest.mark.timeout(120)
def test_child_that_fails_to_start_fails_up_with_its_cause(mixtral_window_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in mixtral_window_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "gpt-unknown"
    (broken / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(broken), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unsupported model_type 'gpt-unknown'" in output
    assert "exited with code" in output and "before it was ready" in output


@pytest.mark.timeout(60)
def test_a_child_that_keeps_dying_is_restarted_with_a_doubling_backoff(capsys, tmp_path):
    """A fake service that exits right after its ready line: each run is reported ready, and the waits
    before the restarts double (0.5 s, 1 s, 2 s); after stop() nothing restarts."""
    cluster = launcher.Cluster(tmp_path)
    service = launcher.Service("fake", ["sh", "-c", "echo fake listening on 127.0.0.1:1; exit 3"])
    cluster.start(service)
    cluster.supervise(service)
    supervisor = next(t for t in threading.enumerate() if t.name == "supervise-fake")
    lines: list[tuple[float, str]] = []
    deadline = time.monotonic() + 30
    while sum("restarting" in line for _, line in lines) < 4:
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
        lines += [(time.monotonic(), line) for line in capsys.readouterr().out.splitlines()]
    cluster.stop()
    restarts = [t for t, line in lines if line == "[fake] exited with code 3; restarting"]
    gaps = [b - a for a, b in zip(restarts, restarts[1:])]
    assert all(gap > wait - 0.1 for gap, wait in zip(gaps, [0.5, 1.0, 2.0])), gaps  # seen within 0.05 s
    assert sum(line == "[fake] ready on 127.0.0.1:1" for _, line in lines) >= 4
    supervisor.join(10)
    assert not supervisor.is_alive(), "the supervisor outlived stop()"


# Supervision: one cluster, whose children are killed one after the other (the tests run in this order).


@pytest.fixture(scope="module")
def supervised(mixtral_window_dir):
    """redis-server, 2 expert shards (1 replica each), 2 routers, gateway; fp32."""
    cluster = Cluster(mixtral_window_dir, "--experts", "2", "--routers", "2", "--dtype", "float32")
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def expected(supervised) -> list[int]:
    return generate(supervised)


def generate(cluster: Cluster, within_s: float = 60) -> list[int]:
    """Greedy tokens, retrying UNAVAILABLE for up to `within_s` while the routers see a restarted child."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return list(cluster.stub.Generate(REQUEST, timeout=30).token_ids)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def kill_and_wait_for_restart(cluster: Cluster, name: str, pid: int) -> str:
    """kill -9 of the child `name`; the address of its next run once `up` reports it ready."""
    mark = len(cluster.up.lines)
    os.kill(pid, signal.SIGKILL)
    cluster.up.wait_for(rf"^\[{re.escape(name)}\] exited with code -9; restarting$", 60, after=mark)
    return cluster.up.wait_for(rf"^\[{re.escape(name)}\] ready on (\S+)$", 120, after=mark).group(1)


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.timeout(240)
def test_two_routers_serve(supervised, expected):
    assert len(set(supervised.routers)) == 2, supervised.up.lines[-30:]
    assert all(serving(router) for router in supervised.routers)
    assert len(expected) == REQUEST.sampling.max_new_tokens


@pytest.mark.timeout(240)
def test_killed_expert_replica_is_restarted(supervised, expected):
    kill_and_wait_for_restart(supervised, "expert-0.0", supervised.expert_pids()["0/2#0"])
    assert generate(supervised) == expected


@pytest.mark.timeout(240)
def test_killed_router_comes_back_at_its_address(supervised, expected):
    address = supervised.routers[0]
    (pid,) = supervised.child_pids(rf" router .*--port {address.rsplit(':', 1)[1]}\b")
    assert kill_and_wait_for_restart(supervised, "router-0", pid) == address
    assert serving(address)
    assert generate(supervised) == expected


@pytest.mark.timeout(240)
def test_killed_redis_comes_back_at_its_url_with_its_data(supervised, expected):
    redis.Redis.from_url(supervised.redis).set("moemesh:test:kept", "yes")  # acknowledged: fsynced to the AOF
    (pid,) = supervised.child_pids(r"^redis-server ")
    assert kill_and_wait_for_restart(supervised, "redis", pid) == supervised.redis
    client = redis.Redis.from_url(supervised.redis)
    assert client.ping() and client.get("moemesh:test:kept") == b"yes"
    assert generate(supervised) == expected


@pytest.mark.timeout(120)
def test_sigterm_after_restarts_stops_everything_and_restarts_nothing(supervised):
    mark = len(supervised.up.lines)
    assert supervised.up.stop() == 0
    assert not supervised.up.session_alive(), "a (restarted) child of moemesh up outlived it"
    assert not [line for line in supervised.up.lines[mark:] if "restarting" in line]
