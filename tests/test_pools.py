"""Expert pools that scale and survive: failover, a joining replica, drain, no replica left, backpressure."""

import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from moemesh.v1 import gateway_pb2
from tests.helpers import Cluster, ExpertProcess, GatewayProcess, RouterProcess

pytestmark = pytest.mark.integration

NEW_TOKENS = 24
PROMPTS = [[(11 * i + 5 * j) % 129000 + 50 for j in range(4 + 3 * i)] for i in range(32)]


@pytest.fixture(scope="module")
def pool(mixtral_dir):
    """2 expert shards x 2 replicas, announcing themselves in the cluster's Redis."""
    cluster = Cluster(mixtral_dir, "--experts", "2", "--replicas", "2", "--dtype", "float32")
    yield cluster
    cluster.close()


@pytest.fixture(scope="module")
def expected(pool) -> list[list[int]]:
    return [tokens(pool, p) for p in PROMPTS]


def tokens(cluster, prompt: list[int], timeout: float = 120) -> list[int]:
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=NEW_TOKENS)
    )
    return [t for r in cluster.stub.GenerateStream(request, timeout=timeout) for t in r.token_ids]


def under_load(stub, during, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    """One stream per prompt; runs `during()` once half have their first token; returns every stream's tokens."""
    started = threading.Semaphore(0)

    def one(prompt):
        request = gateway_pb2.GenerateRequest(
            prompt_token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=NEW_TOKENS)
        )
        out = []
        for i, r in enumerate(stub.GenerateStream(request, timeout=120)):
            if i == 0:
                started.release()
            out += r.token_ids
        return out

    with ThreadPoolExecutor(len(prompts)) as workers:
        results = [workers.submit(one, p) for p in prompts]
        for _ in range(len(prompts) // 2):
            started.acquire(timeout=60)
        during()
        return [r.result() for r in results]


def test_kill_one_replica_under_load_loses_no_stream(pool, expected):
    pids = pool.expert_pids()
    assert "0/2#0" in pids, (pids, pool.up.lines[-30:])
    victim = pids["0/2#0"]
    assert under_load(pool.stub, lambda: os.kill(victim, signal.SIGKILL)) == expected


def test_a_gateway_that_routes_itself_fails_over_on_kill_9(mixtral_dir):
    """`up --routers 0`: the gateway's own calls to the shards lose no stream when a replica dies mid-load."""
    cluster = Cluster(mixtral_dir, "--experts", "2", "--replicas", "2", "--routers", "0", "--dtype", "float32")
    try:
        assert not cluster.routers
        prompts = PROMPTS[:16]
        expected = [tokens(cluster, p) for p in prompts]
        victim = cluster.expert_pids()["1/2#0"]
        assert under_load(cluster.stub, lambda: os.kill(victim, signal.SIGKILL), prompts) == expected
        # the gateway's own calls met the dead replica and went elsewhere
        assert cluster.metric("moemesh_router_replica_failures_total") >= 1
    finally:
        cluster.close()


def test_a_joining_replica_takes_traffic_within_5s(pool, mixtral_dir, expected):
    replica = ExpertProcess(mixtral_dir, "1/2", pool.redis)
    try:
        joined = time.monotonic()
        stop, outputs = threading.Event(), []

        def keep_busy():
            while not stop.is_set():
                outputs.append(tokens(pool, PROMPTS[3]))

        load = threading.Thread(target=keep_busy)
        load.start()
        try:
            while replica.served() == 0:
                assert time.monotonic() - joined < 5, "the new replica got no traffic within 5 s"
                time.sleep(0.1)
        finally:
            stop.set()
            load.join()
        assert outputs and all(out == expected[3] for out in outputs), "the joined pool changed the tokens"
        assert tokens(pool, PROMPTS[3]) == expected[3]
    finally:
        replica.close()


def test_sigterm_drain_under_load_gives_no_client_error(pool, expected):
    victim = pool.expert_pids()["1/2#1"]
    assert under_load(pool.stub, lambda: os.kill(victim, signal.SIGTERM)) == expected


def test_no_replica_left_is_unavailable_then_recovers(mixtral_window_dir):
    cluster = Cluster(mixtral_window_dir, "--experts", "2", "--dtype", "float32")
    try:
        request = gateway_pb2.GenerateRequest(
            prompt_token_ids=[1, 2, 3], sampling=gateway_pb2.SamplingParams(max_new_tokens=4)
        )
        assert len(cluster.stub.Generate(request, timeout=30).token_ids) == 4
        os.kill(cluster.up.proc.pid, signal.SIGSTOP)  # `moemesh up` would restart the replica: freeze it
        os.kill(cluster.expert_pids()["1/2#0"], signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            cluster.stub.Generate(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert re.search(r"no live expert replica holds layer \d+ expert [345]", info.value.details())
        assert time.monotonic() - began < 30
        assert cluster.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=10).num_experts == 6
        replacement = ExpertProcess(mixtral_window_dir, "1/2", cluster.redis)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert len(cluster.stub.Generate(request, timeout=30).token_ids) == 4
                    break
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
                    time.sleep(0.2)
        finally:
            replacement.close()
    finally:
        os.kill(cluster.up.proc.pid, signal.SIGCONT)
        cluster.close()


def test_full_queue_is_resource_exhausted_and_memory_stays_bounded(pool, mixtral_dir):
    gateway = GatewayProcess(mixtral_dir, pool.router, pool.redis, "--max-waiting", "16", "--max-batch-seqs", "4")
    try:

        def rss_mb() -> float:
            with open(f"/proc/{gateway.proc.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

        request = gateway_pb2.GenerateRequest(
            prompt_token_ids=list(range(100, 164)), sampling=gateway_pb2.SamplingParams(max_new_tokens=8)
        )
        gateway.stub.Generate(request, timeout=60)
        before = rss_mb()
        calls = [gateway.stub.Generate.future(request, timeout=120) for _ in range(500)]
        codes = []
        for call in calls:
            try:
                call.result()
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) > 0 and codes.count(grpc.StatusCode.OK) >= 16
        assert rss_mb() - before < 200
    finally:
        gateway.close()


def test_plan_applied_live_loses_nothing(pool, mixtral_dir, expected):
    """`moemesh plan` from the router's measured load; its pools join, the old replicas drain, under load.
    Last in this module: it leaves the pool cluster without its original replicas."""
    out = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "plan", str(mixtral_dir), "--metrics", pool.router_metrics,
         "--pools", "2", "--slots", "3", "--registry", pool.redis],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    before, after = map(float, re.search(r"load: ([\d.]+) as contiguous shards, ([\d.]+) with", out).groups())
    assert after <= before
    specs = re.findall(r"--shard (\S+)", out)
    assert len(specs) == 2 and sorted({int(e) for s in specs for e in s.split(",")}) == [0, 1, 2, 3]
    new_pools: list[ExpertProcess] = []

    def rebalance():
        new_pools.extend(ExpertProcess(mixtral_dir, spec, pool.redis) for spec in specs)
        for victim in pool.expert_pids().values():
            os.kill(victim, signal.SIGTERM)

    try:
        assert under_load(pool.stub, rebalance) == expected
        assert [tokens(pool, p) for p in PROMPTS[:4]] == expected[:4]
        assert all(p.served() > 0 for p in new_pools)
    finally:
        for p in new_pools:
            p.close()


def test_gateway_fails_over_to_another_router(mixtral_window_dir):
    """A gateway with two routers: the one in use is killed under load, the other takes over unseen."""
    cluster = Cluster(mixtral_window_dir, "--experts", "2", "--dtype", "float32")
    spare = RouterProcess(mixtral_window_dir, cluster.redis)
    gateway = GatewayProcess(mixtral_window_dir, f"{spare.address},{cluster.router}", cluster.redis)
    try:
        prompts = [[(7 * i + j) % 500 for j in range(5 + i)] for i in range(16)]
        alone = [tokens_from(gateway.stub, p) for p in prompts]
        assert under_load(gateway.stub, spare.proc.kill, prompts) == alone
    finally:
        gateway.close()
        spare.close()
        cluster.close()


def tokens_from(stub, prompt: list[int]) -> list[int]:
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt, sampling=gateway_pb2.SamplingParams(max_new_tokens=NEW_TOKENS)
    )
    return list(stub.Generate(request, timeout=60).token_ids)


def test_static_placement_file_and_a_replica_of_another_model_is_refused(mixtral_window_dir, mixtral_dir, tmp_path):
    """A router reading its replicas from a placement file serves; a replica of another model that
    announces itself in the same registry gets no traffic."""
    cluster = Cluster(mixtral_window_dir, "--experts", "2", "--dtype", "float32")
    stranger = ExpertProcess(mixtral_dir, "0/2", cluster.redis)
    placement = tmp_path / "placement.txt"
    placement.write_text("# shard 0 and 1\n" + "\n".join(cluster.experts) + "\n")
    router = RouterProcess(mixtral_window_dir, cluster.redis, "--placement-file", str(placement))
    gateway = GatewayProcess(mixtral_window_dir, router.address, cluster.redis)
    try:
        request = gateway_pb2.GenerateRequest(
            prompt_token_ids=[5, 6, 7], sampling=gateway_pb2.SamplingParams(max_new_tokens=8)
        )
        assert len(gateway.stub.Generate(request, timeout=60).token_ids) == 8
        assert len(cluster.stub.Generate(request, timeout=60).token_ids) == 8
        assert stranger.served() == 0
    finally:
        gateway.close()
        router.close()
        stranger.close()
        cluster.close()
