"""The public API through `moemesh up`: bad input, batching invariance, cancellation, health, reflection."""

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moemesh.v1 import gateway_pb2

pytestmark = pytest.mark.integration

P = gateway_pb2.SamplingParams


def generate(cluster, timeout=60, **fields) -> gateway_pb2.GenerateResponse:
    return cluster.stub.Generate(gateway_pb2.GenerateRequest(**fields), timeout=timeout)


def stream_tokens(cluster, prompt: list[int], max_new_tokens: int) -> list[int]:
    request = gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=P(max_new_tokens=max_new_tokens))
    return [t for r in cluster.stub.GenerateStream(request, timeout=120) for t in r.token_ids]


BAD_REQUESTS = [
    ({}, "prompt: empty"),
    ({"prompt_token_ids": [1, 2, 129280]}, "prompt_token_ids[2]: 129280 is outside the vocabulary [0, 129280)"),
    ({"prompt_token_ids": [5, -1]}, "prompt_token_ids[1]"),
    ({"prompt": "hi", "sampling": P(max_new_tokens=0)}, "sampling.max_new_tokens: 0 is outside [1, 4096]"),
    ({"prompt": "hi", "sampling": P(max_new_tokens=5000)}, "sampling.max_new_tokens: 5000 is outside [1, 4096]"),
    ({"prompt": "hi", "sampling": P(temperature=-0.5)}, "sampling.temperature"),
    ({"prompt": "hi", "sampling": P(temperature=math.nan)}, "sampling.temperature: nan"),
    ({"prompt": "hi", "sampling": P(top_p=0.0)}, "sampling.top_p: 0.0 is outside (0, 1]"),
    ({"prompt": "hi", "sampling": P(top_p=1.5)}, "sampling.top_p: 1.5 is outside (0, 1]"),
    ({"prompt_token_ids": [3] * 500, "sampling": P(max_new_tokens=100)}, "exceeds the context length 512"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_REQUESTS, ids=[m for _, m in BAD_REQUESTS])
def test_bad_input_is_invalid_argument_and_service_stays_up(cluster, fields, message):
    for call in (cluster.stub.Generate, lambda req, timeout: list(cluster.stub.GenerateStream(req, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as info:
            call(gateway_pb2.GenerateRequest(**fields), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert message in info.value.details()
    assert len(generate(cluster, prompt="still up?", sampling=P(max_new_tokens=2)).token_ids) == 2


def test_text_prompt_and_model_info(cluster):
    info = cluster.stub.GetModelInfo(gateway_pb2.GetModelInfoRequest(), timeout=10)
    assert (info.model_type, info.vocab_size, info.num_layers, info.num_experts, info.experts_per_token) == (
        "mixtral",
        129280,
        2,
        4,
        2,
    )
    response = generate(cluster, prompt="Hello, 世界", sampling=P(max_new_tokens=5))
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens == 5
    assert response.finish_reason == "length" and response.text


def test_stream_deltas_add_up_to_the_unary_answer(cluster):
    request = gateway_pb2.GenerateRequest(prompt="Tell me a story", sampling=P(max_new_tokens=12))
    parts = list(cluster.stub.GenerateStream(request, timeout=60))
    whole = cluster.stub.Generate(request, timeout=60)
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert "".join(p.text for p in parts) == whole.text
    assert all(not p.finish_reason for p in parts[:-1]) and parts[-1].finish_reason == "length"
    assert parts[-1].usage.completion_tokens == 12


def test_seeded_sampling_repeats(cluster):
    sampling = P(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234)
    first = generate(cluster, prompt_token_ids=[10, 20, 30], sampling=sampling)
    second = generate(cluster, prompt_token_ids=[10, 20, 30], sampling=sampling)
    assert list(first.token_ids) == list(second.token_ids)


def test_sixteen_concurrent_streams_return_what_each_returns_alone(cluster):
    prompts = [[(7 * i + 3 * j) % 129000 + 100 for j in range(3 + 5 * i)] for i in range(16)]
    alone = [stream_tokens(cluster, p, 12) for p in prompts]
    barrier = threading.Barrier(16)

    def together(prompt):
        barrier.wait()
        return stream_tokens(cluster, prompt, 12)

    with ThreadPoolExecutor(16) as pool:
        batched = list(pool.map(together, prompts))
    assert batched == alone


def test_cancelled_stream_leaves_the_batch(cluster):
    request = gateway_pb2.GenerateRequest(prompt_token_ids=[1, 2, 3], sampling=P(max_new_tokens=400))
    stream = cluster.stub.GenerateStream(request, timeout=120)
    next(stream)
    assert cluster.metric("moemesh_num_requests_running") == 1
    stream.cancel()
    deadline = time.monotonic() + 10
    while cluster.metric("moemesh_num_requests_running") != 0:
        assert time.monotonic() < deadline, "cancelled sequence still in the running batch"
        time.sleep(0.1)
    assert len(generate(cluster, prompt_token_ids=[4, 5], sampling=P(max_new_tokens=3)).token_ids) == 3


def test_deadline_exceeded_is_reported(cluster):
    with pytest.raises(grpc.RpcError) as info:
        generate(cluster, timeout=0.3, prompt_token_ids=[1, 2, 3], sampling=P(max_new_tokens=400))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_health_and_reflection(cluster):
    health = health_pb2_grpc.HealthStub(cluster.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(cluster.channel)
    (answer,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for s in answer.list_services_response.service}
    assert "moemesh.v1.Gateway" in names and "grpc.health.v1.Health" in names
