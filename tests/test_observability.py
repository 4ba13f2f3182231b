"""Metrics on every service's /metrics, the gateway's JSON request log, and honest health (README: Observability)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import start_http_server
from prometheus_client.parser import text_string_to_metric_families

from moemesh import faults
from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.settings import GatewaySettings
from moemesh.v1 import expert_pb2, expert_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.gateway.keys import KeyFile, parse_fields
from services.gateway.server import create_service

pytestmark = pytest.mark.integration

P = gateway_pb2.SamplingParams
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SECRET_PROMPT = "zebra quartz marmalade 4417 confidential"
LOG_FIELDS = {
    "trace_id", "key_id", "method", "code", "prompt_tokens", "completion_tokens", "cached_tokens", "ttft_s", "total_s",
}  # fmt: skip

Samples = dict[tuple[str, frozenset], float]


def scrape(address: str) -> Samples:
    """Every sample of a /metrics page, parsed as Prometheus does: {(name, labels): value}."""
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def health(channel: grpc.Channel, service: str = "") -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def wait_health(channel: grpc.Channel, service: str, want: int, timeout_s: float) -> float:
    """Seconds until `service` reports `want`; fails after `timeout_s`."""
    started = time.monotonic()
    while health(channel, service) != want:
        assert time.monotonic() - started < timeout_s, f"health {service!r} not {want} within {timeout_s}s"
        time.sleep(0.05)
    return time.monotonic() - started


@contextmanager
def gateway(model, **settings) -> Iterator[tuple[gateway_pb2_grpc.GatewayStub, grpc.Channel, object]]:
    """An in-process gateway (port 0) with its own /metrics server."""
    service, engine = create_service(GatewaySettings(model=model, dtype="float32", **settings))
    engine.start()
    service.start()
    metrics_server, _ = start_http_server(0, addr="127.0.0.1")
    channel = grpc.insecure_channel(service.address, options=CHANNEL_OPTIONS)
    try:
        yield gateway_pb2_grpc.GatewayStub(channel), channel, (engine, f"127.0.0.1:{metrics_server.server_port}")
    finally:
        channel.close()
        metrics_server.shutdown()
        service.server.stop(0)
        service.stop_beside()
        engine.stop()


@pytest.mark.timeout(180)
def test_gateway_metrics_count_every_call_and_log_one_json_line_each(mixtral_dir, tmp_path, capsys):
    store = KeyFile(tmp_path / "keys")
    secret = store.add(parse_fields("alice", []))
    auth = (("authorization", f"Bearer {secret}"),)
    with gateway(mixtral_dir, api_keys=str(store.path)) as (stub, channel, (engine, metrics_address)):
        before = scrape(metrics_address)
        ok = stub.Generate(
            gateway_pb2.GenerateRequest(prompt=SECRET_PROMPT, sampling=P(max_new_tokens=4)), metadata=auth, timeout=60
        )
        streamed = list(stub.GenerateStream(
            gateway_pb2.GenerateRequest(prompt_token_ids=[5, 6, 7, 8, 9], sampling=P(max_new_tokens=3)),
            metadata=auth, timeout=60,
        ))  # fmt: skip
        with pytest.raises(grpc.RpcError) as bad:
            invalid = gateway_pb2.GenerateRequest(prompt=SECRET_PROMPT, sampling=P(max_new_tokens=0))
            stub.Generate(invalid, metadata=auth, timeout=30)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as anonymous:
            stub.Generate(gateway_pb2.GenerateRequest(prompt=SECRET_PROMPT), timeout=30)
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as no_redis:
            list(stub.Chat(gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(role="user", content="hi")]),
                           metadata=auth, timeout=30))  # fmt: skip
        assert no_redis.value.code() == grpc.StatusCode.UNAVAILABLE

        # A long stream: running and holding KV cache while it goes, both back to 0 once cancelled.
        long = stub.GenerateStream(
            gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=P(max_new_tokens=400)),
            metadata=auth, timeout=120,
        )  # fmt: skip
        next(long)
        during = scrape(metrics_address)
        assert value(during, "moemesh_num_requests_running") == 1
        assert value(during, "moemesh_kv_cache_usage_bytes") > 0
        long.cancel()
        deadline = time.monotonic() + 10
        while True:
            after = scrape(metrics_address)
            settled = (
                value(after, "moemesh_num_requests_running") == 0
                and value(after, "moemesh_requests_total", method="GenerateStream", code="CANCELLED")
                - value(before, "moemesh_requests_total", method="GenerateStream", code="CANCELLED")
                == 1
            )
            if settled:
                break
            assert time.monotonic() < deadline, "the cancelled stream was not counted or is still running"
            time.sleep(0.1)
        assert value(after, "moemesh_kv_cache_usage_bytes") == 0
        assert value(after, "moemesh_num_requests_waiting") == 0

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("moemesh_requests_total", method="Generate", code="OK") == 1
    assert delta("moemesh_requests_total", method="GenerateStream", code="OK") == 1
    assert delta("moemesh_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta("moemesh_requests_total", method="Generate", code="UNAUTHENTICATED") == 1
    assert delta("moemesh_requests_total", method="Chat", code="UNAVAILABLE") == 1
    assert total(after, "moemesh_requests_total") - total(before, "moemesh_requests_total") == 6
    prompt_tokens = ok.usage.prompt_tokens + streamed[-1].usage.prompt_tokens
    assert delta("moemesh_prompt_tokens_total") == prompt_tokens  # the cancelled stream never finished
    completions = len(ok.token_ids) + sum(len(r.token_ids) for r in streamed)
    assert completions == 7
    assert delta("moemesh_generation_tokens_total") >= completions + 1  # + the cancelled stream's
    for finished in ("moemesh_e2e_request_latency_seconds_count",):
        assert delta(finished) == 2
    assert delta("moemesh_time_to_first_token_seconds_count") == 3  # the cancelled stream had a first token
    assert delta("moemesh_request_queue_seconds_count") == 3
    assert delta("moemesh_inter_token_latency_seconds_count") >= 3 + 2
    assert delta("moemesh_gateway_step_seconds_count") > 0  # still there for bench/throughput.py

    out, err = capsys.readouterr()
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert len(lines) == 6, err
    for line in lines:
        assert set(line) == LOG_FIELDS
        assert line["trace_id"] == ""  # no tracing in this build
    generate, stream, invalid, unauthenticated, unavailable, cancelled = lines
    assert (generate["method"], generate["code"], generate["key_id"]) == ("Generate", "OK", "alice")
    assert (generate["prompt_tokens"], generate["completion_tokens"], generate["cached_tokens"]) == (
        ok.usage.prompt_tokens, 4, 0,
    )  # fmt: skip
    assert 0 < generate["ttft_s"] <= generate["total_s"]
    assert (stream["method"], stream["code"], stream["completion_tokens"]) == ("GenerateStream", "OK", 3)
    assert (invalid["code"], invalid["key_id"], invalid["ttft_s"]) == ("INVALID_ARGUMENT", "alice", None)
    assert (unauthenticated["code"], unauthenticated["key_id"]) == ("UNAUTHENTICATED", "")
    assert (unavailable["method"], unavailable["code"]) == ("Chat", "UNAVAILABLE")
    assert (cancelled["method"], cancelled["code"]) == ("GenerateStream", "CANCELLED")
    # Prompts and outputs are never logged, anywhere.
    assert SECRET_PROMPT not in out + err
    assert "zebra" not in out + err
    assert all(text not in err for text in (ok.text, streamed[0].text) if len(text.strip()) >= 6)


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected crash
def test_readiness_turns_not_serving_when_the_engine_thread_dies(mixtral_dir):
    with gateway(mixtral_dir) as (stub, channel, (engine, _)):
        faults.crash_engine_after(engine, 3.0)
        wait_health(channel, "moemesh.v1.Gateway", SERVING, 10)
        assert health(channel, "") == SERVING

        # Streams in the engine when it dies end with UNAVAILABLE rather than hang. Two clients stream one
        # request after another, so that at least one is in the engine when it dies.
        def stream_until_refused() -> grpc.RpcError:
            request = gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2], sampling=P(max_new_tokens=400))
            while True:
                try:
                    for _ in stub.GenerateStream(request, timeout=60):
                        pass
                except grpc.RpcError as error:
                    return error

        with ThreadPoolExecutor(2) as pool:
            errors = list(pool.map(lambda _: stream_until_refused(), range(2)))
        assert {e.code() for e in errors} == {grpc.StatusCode.UNAVAILABLE}, [e.details() for e in errors]
        assert any("engine stopped" in e.details() for e in errors), [e.details() for e in errors]
        deadline = time.monotonic() + 30
        while engine.alive:
            assert time.monotonic() < deadline, "the fault hook did not kill the engine thread"
            time.sleep(0.02)
        assert wait_health(channel, "moemesh.v1.Gateway", NOT_SERVING, 2.0) <= 2.0
        assert health(channel, "") == SERVING  # the process answers; it is not ready
        with pytest.raises(grpc.RpcError) as refused:  # new work is refused rather than left hanging
            stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(300)
def test_every_service_exports_metrics_matching_the_traffic(cluster):
    expert_metrics = [m.group(1) for line in cluster.up.lines
                      if (m := re.match(r"^\[expert-[\d.]+\] expert metrics on (\S+)", line))]  # fmt: skip
    assert len(expert_metrics) == 2
    addresses = [cluster.metrics, cluster.router_metrics, *expert_metrics]
    before = [scrape(a) for a in addresses]
    responses = [
        cluster.stub.Generate(
            gateway_pb2.GenerateRequest(prompt_token_ids=[10 + i, 20, 30], sampling=P(max_new_tokens=3)), timeout=60
        )
        for i in range(3)
    ]
    with pytest.raises(grpc.RpcError) as bad:
        cluster.stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=[1, 129280]), timeout=30)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = [scrape(a) for a in addresses]
    (gw0, router0, *experts0), (gw1, router1, *experts1) = before, after

    def delta(a: Samples, b: Samples, name: str, **labels: str) -> float:
        return total(b, name, **labels) - total(a, name, **labels)

    assert delta(gw0, gw1, "moemesh_requests_total", method="Generate", code="OK") == 3
    assert delta(gw0, gw1, "moemesh_requests_total", method="Generate", code="INVALID_ARGUMENT") == 1
    assert delta(gw0, gw1, "moemesh_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in responses) == 9
    assert delta(gw0, gw1, "moemesh_generation_tokens_total") == 9
    assert delta(gw0, gw1, "moemesh_e2e_request_latency_seconds_count") == 3
    # Each step's tokens go to experts_per_token (2) experts in each MoE layer (2 layers). Tokens stepped: each
    # request's prompt (3), then its first 2 generated tokens (the 3rd is sampled, never run through the model).
    routed = delta(router0, router1, "moemesh_router_expert_tokens_total")
    assert routed == 3 * (3 + 2) * 2 * 2
    for layer in ("0", "1"):
        by_router = delta(router0, router1, "moemesh_router_expert_tokens_total", layer=layer)
        by_experts = sum(delta(a, b, "moemesh_expert_tokens_total", layer=layer) for a, b in zip(experts0, experts1))
        assert by_experts >= by_router == routed / 2  # more only if a call was hedged
        assert sum(delta(a, b, "moemesh_expert_call_seconds_count", layer=layer)
                   for a, b in zip(experts0, experts1)) > 0  # fmt: skip
    assert delta(router0, router1, "moemesh_router_replica_call_seconds_count") > 0
    calls = "moemesh_router_replica_call_seconds_count"
    replicas = {dict(labels)["replica"] for name, labels in router1 if name == calls}
    assert replicas == set(cluster.experts)
    assert delta(router0, router1, "moemesh_router_replica_failures_total") == 0
    for samples in experts1:
        assert value(samples, "moemesh_expert_parameter_bytes") > 0
        assert value(samples, "moemesh_expert_queue_depth") == 0
    # What each service computes with, as the labels of one info sample, the same as the line it printed.
    for samples, kinds in ((gw1, {"attention", "dense", "lm_head", "experts"}), (router1, {"gates"}),
                           *((e, {"experts"}) for e in experts1)):  # fmt: skip
        (labels,) = [dict(labels) for name, labels in samples if name == "moemesh_compute_info"]
        assert labels["device"] == "cpu" and labels["dtype"] in ("float32", "bfloat16")
        assert {key.removeprefix("kernel_") for key in labels if key.startswith("kernel_")} == kinds


@pytest.mark.timeout(120)
def test_readiness_follows_a_stopped_router(cluster):
    gateway_channel = cluster.channel
    wait_health(gateway_channel, "moemesh.v1.Gateway", SERVING, 10)
    (router_pid,) = cluster.child_pids(r" router ")
    os.kill(router_pid, signal.SIGSTOP)
    try:
        assert wait_health(gateway_channel, "moemesh.v1.Gateway", NOT_SERVING, 2.0) <= 2.0
        assert health(gateway_channel, "") == SERVING
    finally:
        os.kill(router_pid, signal.SIGCONT)
    wait_health(gateway_channel, "moemesh.v1.Gateway", SERVING, 5.0)
    response = cluster.stub.Generate(
        gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2], sampling=P(max_new_tokens=2)), timeout=60
    )
    assert len(response.token_ids) == 2


@pytest.mark.timeout(120)
def test_expert_is_not_serving_until_its_shard_is_loaded(mixtral_dir):
    argv = [sys.executable, "-m", "moemesh.cli", "expert", "--model", str(mixtral_dir), "--port", "0", "--dtype",
            "float32", "--metrics-port", "0"]  # fmt: skip
    env = dict(os.environ, MOEMESH_FAULTS="expert_load_delay_s=3")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)
    try:
        lines = iter(proc.stdout)
        metrics = next(m.group(1) for line in lines if (m := re.match(r"^expert metrics on (\S+)", line)))
        address = next(m.group(1) for line in lines if (m := re.match(r"^expert loading shard \S+ on (\S+)", line)))
        with grpc.insecure_channel(address) as channel:
            assert health(channel) == NOT_SERVING  # bound and answering, not loaded yet
            with pytest.raises(grpc.RpcError) as loading:
                expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=5)
            assert loading.value.code() == grpc.StatusCode.UNAVAILABLE
            assert value(scrape(metrics), "moemesh_expert_parameter_bytes") == 0
            assert next(line for line in lines if line.startswith("expert listening on")).split()[-1] == address
            assert health(channel) == SERVING
            info = expert_pb2_grpc.ExpertStub(channel).Describe(expert_pb2.DescribeExpertRequest(), timeout=5)
            assert value(scrape(metrics), "moemesh_expert_parameter_bytes") == info.parameter_bytes > 0
    finally:
        proc.terminate()
        proc.wait(30)
