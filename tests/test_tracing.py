"""Tracing through `moemesh up`: spans exported over OTLP to a receiver in this process, one trace per call."""

import os
import threading
import time
from collections import defaultdict
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from moemesh.v1 import gateway_pb2
from tests.helpers import Cluster

pytestmark = pytest.mark.integration

REQUEST = gateway_pb2.GenerateRequest(
    prompt_token_ids=[5, 6, 7, 8, 9], sampling=gateway_pb2.SamplingParams(max_new_tokens=6, temperature=0)
)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver: keeps every span with its resource's attributes."""

    def __init__(self):
        self.spans: list[tuple[dict, trace_pb2.Span]] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context):
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    self.spans += [(resource, span) for span in scope_spans.spans]
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[tuple[dict, trace_pb2.Span]]:
        with self._lock:
            return [(r, s) for r, s in self.spans if s.trace_id.hex() == trace_id]

    def env(self, exporter: str) -> dict[str, str]:
        return os.environ | {
            "OTEL_TRACES_EXPORTER": exporter,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_BSP_SCHEDULE_DELAY": "200",
        }


def _value(value) -> object:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def _attributes(span: trace_pb2.Span) -> dict:
    return {a.key: _value(a.value) for a in span.attributes}


def _processes(spans: list[tuple[dict, trace_pb2.Span]]) -> dict[str, set[int]]:
    """Service name -> pids of the processes that sent spans."""
    found = defaultdict(set)
    for resource, _ in spans:
        found[resource["service.name"]].add(resource["process.pid"])
    return found


def _wait_for(receiver: Receiver, trace_id: str, done, timeout_s: float = 30) -> list:
    deadline = time.monotonic() + timeout_s
    while not done(spans := receiver.of_trace(trace_id)):
        assert time.monotonic() < deadline, f"spans of trace {trace_id}: {[(r, s.name) for r, s in spans]}"
        time.sleep(0.2)
    return spans


@pytest.fixture(scope="module")
def receiver() -> Receiver:
    r = Receiver()
    yield r
    r.server.stop(0)


@pytest.fixture(scope="module")
def traced(mixtral_dir, receiver) -> Cluster:
    """`moemesh up` exporting its spans to `receiver`."""
    cluster = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32", env=receiver.env("otlp"))
    yield cluster
    cluster.close()


@pytest.mark.timeout(300)
def test_one_stream_is_one_trace_across_every_process(traced, receiver):
    responses = traced.stub.GenerateStream(REQUEST, timeout=120)
    trace_id = dict(responses.initial_metadata())["x-trace-id"]
    tokens = [t for r in responses for t in r.token_ids]
    assert len(trace_id) == 32 and len(tokens) == 6

    def complete(spans) -> bool:
        processes = _processes(spans)
        names = {s.name for _, s in spans}
        return (
            {"moemesh.v1.Gateway/GenerateStream", "gateway.decode"} <= names
            and len(processes["moemesh-router"]) == 1
            and len(processes["moemesh-expert"]) == 2
        )

    spans = _wait_for(receiver, trace_id, complete)
    by_name = defaultdict(list)
    for _, span in spans:
        by_name[span.name].append(span)
    [server] = by_name["moemesh.v1.Gateway/GenerateStream"]
    assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    [admission], [prefill], [decode] = (
        by_name["gateway.admission"],
        by_name["gateway.prefill"],
        by_name["gateway.decode"],
    )
    assert {admission.parent_span_id, prefill.parent_span_id, decode.parent_span_id} == {server.span_id}
    assert _attributes(prefill)["moemesh.prompt_tokens"] == 5
    decoded = _attributes(decode)
    assert decoded["moemesh.completion_tokens"] == 6 and decoded["moemesh.decode_tokens"] == 5
    assert decoded["moemesh.finish_reason"] == "length" and decoded["moemesh.decode_ms"] > 0
    # Engine steps: children of the request's prefill or decode span, linked to it; router calls under
    # the steps, experts under the router calls.
    gateway_phases = {prefill.span_id, decode.span_id}
    steps = by_name["gateway.step"]
    assert len(steps) == 6  # one prefill step and five decode steps
    assert all(s.parent_span_id in gateway_phases for s in steps)
    assert all({link.span_id for link in s.links} == {s.parent_span_id} for s in steps)
    router_calls = by_name["moe.layer"]
    assert router_calls and all(s.parent_span_id in {s.span_id for s in steps} for s in router_calls)
    assert all(not s.links for s in router_calls)
    expert_calls = by_name["expert.forward"]
    assert expert_calls and all(s.parent_span_id in {s.span_id for s in router_calls} for s in expert_calls)


@pytest.mark.timeout(120)
def test_generate_and_its_errors_return_the_trace_id(traced, receiver):
    _, call = traced.stub.Generate.with_call(REQUEST, timeout=60)
    trace_id = dict(call.initial_metadata())["x-trace-id"]
    _wait_for(receiver, trace_id, lambda spans: "moemesh.v1.Gateway/Generate" in {s.name for _, s in spans})
    bad = gateway_pb2.GenerateRequest(prompt_token_ids=[5, -1])
    with pytest.raises(grpc.RpcError) as failed:
        traced.stub.Generate(bad, timeout=60)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trace_id = dict(failed.value.initial_metadata())["x-trace-id"]
    spans = _wait_for(receiver, trace_id, lambda spans: bool(spans))
    assert [s.status.code for _, s in spans] == [trace_pb2.Status.STATUS_CODE_ERROR]


@pytest.mark.timeout(300)
def test_chat_turn_traces_its_session_load_and_store(traced, receiver):
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.Message(role="user", content="Hello")],
        sampling=gateway_pb2.SamplingParams(max_new_tokens=4, temperature=0),
    )
    responses = traced.stub.Chat(request, timeout=120)
    trace_id = dict(responses.initial_metadata())["x-trace-id"]
    assert list(responses)[-1].finish_reason

    def complete(spans) -> bool:
        return {"session.load", "session.kv_load", "session.store", "gateway.decode"} <= {s.name for _, s in spans}

    spans = _wait_for(receiver, trace_id, complete)
    [server] = [s for _, s in spans if s.name == "moemesh.v1.Gateway/Chat"]
    sessions = [s for _, s in spans if s.name.startswith("session.")]
    assert {s.parent_span_id for s in sessions} == {server.span_id}


@pytest.mark.timeout(300)
def test_tracing_is_off_by_default(mixtral_dir, receiver):
    """Without OTEL_TRACES_EXPORTER (the endpoint alone does not turn it on) a call works, has no
    `x-trace-id`, and no process exports a span."""
    env = receiver.env("otlp")
    del env["OTEL_TRACES_EXPORTER"]
    before = len(receiver.spans)
    cluster = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32", env=env)
    try:
        responses = cluster.stub.GenerateStream(REQUEST, timeout=120)
        assert "x-trace-id" not in dict(responses.initial_metadata())
        assert len([t for r in responses for t in r.token_ids]) == 6
        time.sleep(1.0)  # 5 x the export delay the services would use if tracing were on
        assert len(receiver.spans) == before
    finally:
        cluster.close()
