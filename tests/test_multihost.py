"""Several hosts for real, on one machine: Redis, the gateway, the router and two replicas of each expert shard
each in a network namespace of its own, cabled to a bridge (tests/netns.py). Under 16 streams one expert host's
cable is pulled (its TCP connections hang, as a real link down does) and plugged in again: every stream
completes with the tokens of an undisturbed run, and the host rejoins the registry and takes traffic again."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis

from moemesh import registry
from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.v1 import expert_pb2, expert_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from tests.netns import Network, netns_unavailable

pytestmark = pytest.mark.integration

NEW_TOKENS = 64
PROMPTS = [[(19 * i + 7 * j) % 120000 + 70 for j in range(4 + 2 * i)] for i in range(16)]
EXPERT_HOSTS = {"e0a": "0/2", "e0b": "0/2", "e1a": "1/2", "e1b": "1/2"}
VICTIM = "e0a"


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout_s:g}s"
        time.sleep(0.05)


class Hosts:
    """The services, each on a host of its own, and the test's clients to them (from the client host)."""

    def __init__(self, network: Network, model_dir):
        self.network = network
        address = {name: network.add_host(name) for name in ["redis", "router", "gateway", *EXPERT_HOSTS]}
        self.expert = {name: f"{address[name]}:7000" for name in EXPERT_HOSTS}
        redis_url = f"redis://{address['redis']}:6379/0"
        network.start("redis", "redis-server", "--bind", address["redis"], "--port", "6379", "--save", "",
                      "--appendonly", "no", "--protected-mode", "no")  # fmt: skip
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=5)
        wait_until(self._redis_answers, 20, "redis-server did not answer PING")
        experts = [
            network.start_moemesh(name, "expert", model_dir, "--shard", shard, "--registry", redis_url)
            for name, shard in EXPERT_HOSTS.items()
        ]
        self.router = network.start_moemesh("router", "router", model_dir, "--registry", redis_url)
        gateway = network.start_moemesh("gateway", "gateway", model_dir, "--router", f"{address['router']}:7000",
                                        "--redis", redis_url)  # fmt: skip
        for process in [*experts, self.router, gateway]:
            process.wait_for(r"^\w+ listening on ", 120)
        self.channel = grpc.insecure_channel(f"{address['gateway']}:7000", options=CHANNEL_OPTIONS)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)

    def _redis_answers(self) -> bool:
        try:
            return self.redis.ping()
        except redis.ConnectionError:
            return False

    def announced(self, host: str) -> bool:
        return bool(self.redis.exists(registry.PREFIX + self.expert[host]))

    def served(self, host: str) -> int:
        with grpc.insecure_channel(self.expert[host]) as channel:
            info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
        return info.requests_served

    def close(self) -> None:
        self.channel.close()
        self.redis.close()


@pytest.fixture
def hosts(mixtral_dir):
    if reason := netns_unavailable():
        pytest.skip(reason)
    network = Network()
    try:
        cluster = Hosts(network, mixtral_dir)
        yield cluster
        cluster.close()
    finally:
        network.close()


def stream(stub, prompt: list[int], on_tokens=lambda new, so_far: None) -> list[int]:
    """One GenerateStream's tokens; `on_tokens(new, so_far)` as each response arrives."""
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=NEW_TOKENS)
    )
    out = []
    for response in stub.GenerateStream(request, timeout=120):
        out += response.token_ids
        on_tokens(len(response.token_ids), len(out))
    return out


def under_16_streams(stub, during) -> list[list[list[int]]]:
    """16 clients in a closed loop, one prompt each, streaming it again and again until `during(received)`,
    run once every client has 4 tokens, has returned; `received()` counts the tokens of all streams so far.
    Every client's streams, each run to its end."""
    started = threading.Semaphore(0)
    stop = threading.Event()
    received = [0]
    lock = threading.Lock()

    def client(prompt: list[int]) -> list[list[int]]:
        def on_tokens(new: int, so_far: int) -> None:
            with lock:
                received[0] += new
            if so_far - new < 4 <= so_far and not runs:
                started.release()

        runs: list[list[int]] = []
        while not runs or not stop.is_set():
            runs.append(stream(stub, prompt, on_tokens))
        return runs

    with ThreadPoolExecutor(len(PROMPTS)) as workers:
        clients = [workers.submit(client, p) for p in PROMPTS]
        try:
            for _ in PROMPTS:
                assert started.acquire(timeout=60), "the streams did not start"
            during(lambda: received[0])
        finally:
            stop.set()
        return [c.result() for c in clients]


@pytest.mark.timeout(240)
def test_an_expert_host_cut_off_under_16_streams_loses_nothing_and_rejoins(hosts):
    with ThreadPoolExecutor(len(PROMPTS)) as workers:
        expected = list(workers.map(lambda p: stream(hosts.stub, p), PROMPTS))
    assert all(len(tokens) == NEW_TOKENS for tokens in expected)
    assert hosts.served(VICTIM) > 0, "the victim took no traffic before the fault"
    victim = hosts.expert[VICTIM]
    timeline = {}

    def cut_off_and_back(received) -> None:
        mark = len(hosts.router.lines)
        began, before = time.monotonic(), received()
        hosts.network.cut(VICTIM)
        try:
            wait_until(lambda: not hosts.announced(VICTIM), 20, "the cut host's announcement did not expire")
            hosts.router.wait_for(rf"expert replica {victim} left", 20, after=mark)
            timeline["cut off s"] = round(time.monotonic() - began, 2)
            timeline["tokens while cut off"] = received() - before
            timeline["router warnings"] = sum(
                victim in line and "WARNING" in line for line in hosts.router.lines[mark:]
            )
            assert received() > before, "no stream moved while the host was cut off"
            mark, began = len(hosts.router.lines), time.monotonic()
        finally:
            hosts.network.restore(VICTIM)
        wait_until(lambda: hosts.announced(VICTIM), 30, "the host did not rejoin the registry")
        hosts.router.wait_for(rf"expert replica {victim} joined", 20, after=mark)
        timeline["rejoined s"] = round(time.monotonic() - began, 2)
        served = hosts.served(VICTIM)
        wait_until(lambda: hosts.served(VICTIM) > served, 30, "the rejoined host took no traffic")
        timeline["serving again s"] = round(time.monotonic() - began, 2)

    runs = under_16_streams(hosts.stub, cut_off_and_back)
    wrong = [(i, j) for i, client in enumerate(runs) for j, tokens in enumerate(client) if tokens != expected[i]]
    timeline["streams"] = sum(map(len, runs))
    print(timeline)
    assert not wrong, f"streams (client, run) with other tokens than undisturbed: {wrong}"
