"""Fault isolation through real processes: one client's bad or impatient calls, a hung router and a slow
expert replica never fail another client's request."""

import os
import signal
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from moemesh.launcher import ClusterSpec
from moemesh.rpc import CHANNEL_OPTIONS, KEEPALIVE_TIME_MS, KEEPALIVE_TIMEOUT_MS
from moemesh.v1 import expert_pb2, expert_pb2_grpc, gateway_pb2, router_pb2, router_pb2_grpc, tensor_pb2
from tests.helpers import Cluster, ExpertProcess, GatewayProcess, RouterProcess

pytestmark = pytest.mark.integration

PROMPT = [101, 2024, 3301, 77, 15, 901]


def generate(stub, prompt: list[int], max_new_tokens: int, timeout: float = 120) -> list[int]:
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens)
    )
    return [t for r in stub.GenerateStream(request, timeout=timeout) for t in r.token_ids]


def impatient_client(stub, stop: threading.Event, codes: list) -> None:
    """Generate with deadlines of 1, 5 and 20 ms in a loop."""
    while not stop.is_set():
        for deadline_s in (0.001, 0.005, 0.02):
            try:
                generate(stub, [7, 8, 9, 10], 50, timeout=deadline_s)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())


def malformed_router_client(router: str, stop: threading.Event, codes: list) -> None:
    """Malformed tensors to the router, all on one stream."""
    bad = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 64], data=b"\0" * 10)

    def requests():
        i = 0
        while not stop.is_set():
            i += 1
            yield router_pb2.MoeRequest(request_id=i, layer=0, hidden=bad)
            time.sleep(0.002)

    with grpc.insecure_channel(router, options=CHANNEL_OPTIONS) as channel:
        for response in router_pb2_grpc.RouterStub(channel).Forward(requests(), timeout=300):
            codes.append(response.status.code)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("noise", ["deadlines", "malformed"])
def test_another_clients_bad_calls_never_fail_a_stream(cluster, noise):
    expected = generate(cluster.stub, PROMPT, 200)
    stop, codes = threading.Event(), []
    if noise == "deadlines":
        noisy = threading.Thread(target=impatient_client, args=(cluster.stub, stop, codes))
    else:
        noisy = threading.Thread(target=malformed_router_client, args=(cluster.router, stop, codes))
    noisy.start()
    try:
        for _ in range(2):
            assert generate(cluster.stub, PROMPT, 200) == expected
    finally:
        stop.set()
        noisy.join(60)
    if noise == "deadlines":
        assert codes and set(codes) <= {grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.OK}, set(codes)
    else:
        assert codes and set(codes) == {grpc.StatusCode.INVALID_ARGUMENT.value[0]}


@pytest.mark.timeout(120)
def test_a_request_right_after_an_expired_one_succeeds(cluster):
    """The case that used to fail: a 1-10 ms request alone in a step, then another client's request."""
    for i in range(12):
        with pytest.raises(grpc.RpcError) as info:
            generate(cluster.stub, [7, 8, 9, i], 50, timeout=0.001 * (1 + i % 10))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(generate(cluster.stub, PROMPT, 4)) == 4


def streams_with_times(stub, prompts, during, max_new_tokens: int):
    """One stream per prompt; `during()` runs once half have 3 tokens (so there are normal gaps to compare
    with). Returns tokens and arrival times."""
    started = threading.Semaphore(0)

    def one(prompt):
        request = gateway_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=max_new_tokens)
        )
        tokens, times = [], []
        for i, r in enumerate(stub.GenerateStream(request, timeout=120)):
            times.append(time.monotonic())
            if i == 2:
                started.release()
            tokens += r.token_ids
        return tokens, times

    with ThreadPoolExecutor(len(prompts)) as workers:
        results = [workers.submit(one, p) for p in prompts]
        for _ in range(len(prompts) // 2):
            started.acquire(timeout=60)
        at = time.monotonic()
        during()
        return [r.result() for r in results], at


@pytest.mark.timeout(300)
def test_sigstop_of_a_router_under_16_streams(mixtral_dir):
    cluster = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32")
    second = RouterProcess(mixtral_dir, cluster.redis)
    gateway = GatewayProcess(mixtral_dir, f"{second.address},{cluster.router}", cluster.redis)
    prompts = [[(13 * i + 7 * j) % 120000 + 60 for j in range(5 + i)] for i in range(16)]
    try:
        expected = [generate(gateway.stub, p, 40) for p in prompts]
        results, stopped_at = streams_with_times(
            gateway.stub, prompts, lambda: os.kill(second.proc.pid, signal.SIGSTOP), 40
        )
        assert [tokens for tokens, _ in results] == expected
        before = [b - a for _, times in results for a, b in zip(times, times[1:]) if b < stopped_at]
        after = [b - a for _, times in results for a, b in zip(times, times[1:]) if b >= stopped_at]
        normal = statistics.median(before)
        stall = max(after)
        # The hedge (floor 1 s, more when the router's recent p99 is high) or else keepalive breaking the
        # stream (2 s + 2 s) ends the stall, whichever comes first.
        budget = (KEEPALIVE_TIME_MS + KEEPALIVE_TIMEOUT_MS) / 1000
        print(f"normal step {normal * 1000:.0f} ms, longest gap after SIGSTOP {stall * 1000:.0f} ms")
        assert stall < 3 * normal + budget, f"stall {stall:.2f} s, normal step {normal:.3f} s"
    finally:
        os.kill(second.proc.pid, signal.SIGCONT)
        gateway.close()
        second.close()
        cluster.close()


def served(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
    return info.requests_served


@pytest.mark.timeout(300)
def test_a_slow_replica_loses_its_traffic_and_no_request_fails(mixtral_dir):
    cluster = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32")
    # As many threads as `up` gives its shards, so that both replicas of shard 0/2 start equally fast.
    threads = ClusterSpec(model=mixtral_dir, experts=2).service_threads()
    slow = ExpertProcess(mixtral_dir, "0/2", cluster.redis, "--threads", str(threads), faults="expert_slowdown=10")
    normal = cluster.experts[0]  # the other replica of shard 0/2
    stop, failures, done = threading.Event(), [], []

    def client(i: int) -> None:
        while not stop.is_set():
            try:
                generate(cluster.stub, [50 + i, 60, 70 + i], 16)
                done.append(i)
            except grpc.RpcError as exc:
                failures.append(exc)

    def share(seconds: float) -> float:
        a, b = served(slow.address), served(normal)
        time.sleep(seconds)  # a measuring window, not a wait for a condition
        da, db = served(slow.address) - a, served(normal) - b
        assert da + db > 50, "too little traffic to measure"
        return da / (da + db)

    workers = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    try:
        deadline = time.monotonic() + 30
        while served(slow.address) == 0:
            assert time.monotonic() < deadline, "the new replica never got traffic"
            generate(cluster.stub, PROMPT, 4)
        for w in workers:
            w.start()
        time.sleep(3)  # a settling window: the new replica's first, cold calls leave its latency estimate
        before = share(4)
        os.kill(slow.proc.pid, signal.SIGUSR1)  # from now on its calls take 10x as long
        time.sleep(10)  # the bound: within 10 s
        after = share(4)
        print(f"slow replica's share: {before:.1%} before, {after:.1%} after the slowdown")
        assert before > 0.2
        assert after < 0.2 * before
    finally:
        stop.set()
        for w in workers:
            if w.is_alive():
                w.join(120)
        slow.close()
        cluster.close()
    assert not failures, failures[:3]
    assert len(done) > 20
