"""The engine step's span and the internal calls' spans under it, with a sampler that drops some requests."""

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON
from opentelemetry.trace import format_span_id

from moemesh import tracing

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def exported(monkeypatch) -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_enabled", True)
    return exporter


def _request(sampled: bool):
    return TracerProvider(sampler=ALWAYS_ON if sampled else ALWAYS_OFF).get_tracer("client").start_span("request")


def test_a_step_is_a_child_of_its_first_sampled_request_and_links_every_sampled_one(exported):
    unsampled, first, second = _request(False), _request(True), _request(True)
    with tracing.step("gateway.step", [unsampled, first, second], {"moemesh.sequences": 3}):
        sent = tracing.outgoing_traceparent()
        with tracing.call_span("moe.layer", sent, {"moemesh.layer": 1}):
            sent_on = tracing.outgoing_traceparent()
            with tracing.call_span("expert.forward", sent_on, {}):
                pass
    assert tracing.outgoing_traceparent() == ""  # reset after the step
    spans = {s.name: s for s in exported.get_finished_spans()}
    step, layer, expert = spans["gateway.step"], spans["moe.layer"], spans["expert.forward"]
    assert step.parent.span_id == first.get_span_context().span_id
    assert step.context.trace_id == first.get_span_context().trace_id
    assert [link.context.span_id for link in step.links] == [
        first.get_span_context().span_id,
        second.get_span_context().span_id,
    ]
    assert layer.parent.span_id == step.context.span_id and not layer.links
    assert expert.parent.span_id == layer.context.span_id
    assert sent.split("-")[2] == format_span_id(step.context.span_id)
    assert sent_on.split("-")[2] == format_span_id(layer.context.span_id)


def test_a_step_without_a_sampled_request_is_not_traced_anywhere(exported):
    with tracing.step("gateway.step", [_request(False), _request(False)], {}):
        sent = tracing.outgoing_traceparent()
        with tracing.call_span("moe.layer", sent, {}):
            assert tracing.outgoing_traceparent() == ""
    assert sent == "" and exported.get_finished_spans() == ()


def test_nothing_is_recorded_while_tracing_is_off(exported, monkeypatch):
    monkeypatch.setattr(tracing, "_enabled", False)
    with tracing.step("gateway.step", [_request(True)], {}):
        assert tracing.outgoing_traceparent() == ""
    assert exported.get_finished_spans() == ()
