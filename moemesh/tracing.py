"""OpenTelemetry tracing: set up from the standard `OTEL_*` variables; W3C trace context between services.

Off unless `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, `console`; `none` or unset: off). Off, no
tracer provider is installed, `enabled()` is False and the helpers here do nothing, so callers skip their
per-step and per-token work. On, each service names itself (`service.name`, unless `OTEL_SERVICE_NAME`
is set) and exports in batches (`OTEL_BSP_*`); the OTLP exporter reads `OTEL_EXPORTER_OTLP_*`.

The gateway's public calls carry their trace context in gRPC metadata (`traceparent`, read with OTel's
global propagator). The internal calls ride long-lived bidirectional streams, where gRPC headers are per
stream, not per call, and one call (one MoE layer of one engine step) serves many requests; so each
`MoeRequest`/`ExpertRequest` carries the caller's span as a W3C `traceparent`, and the callee's span is its
child. A step serves many requests: the gateway's span of the step (`step`) is a child of its first
sampled request's span and links to every sampled request's span, once per step, so the router's and the
experts' spans of the step's calls (a dozen per step) carry no links of their own; a lone request's trace
runs gateway -> step -> router -> experts. A step with no sampled request sends no traceparent, and the
callees record nothing for it.
"""

import functools
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from importlib.metadata import entry_points

from opentelemetry import propagate, trace
from opentelemetry.trace import Link, Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

from moemesh.errors import ConfigError

log = logging.getLogger(__name__)

tracer = trace.get_tracer("moemesh")  # a proxy: real once `setup` installs a provider, a no-op before
_W3C = TraceContextTextMapPropagator()
_enabled = False
# The traceparent the internal calls made from this context send (the current step's or call's span).
_outgoing: ContextVar[str] = ContextVar("moemesh_traceparent", default="")


def setup(service_name: str) -> bool:
    """Installs the tracer provider and exporters that `OTEL_TRACES_EXPORTER` names; False: tracing is off."""
    global _enabled
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n and n != "none"]
    if not names:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes: dict[str, AttributeValue] = {"process.pid": os.getpid()}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)
    _enabled = True
    log.info("tracing on: exporting spans to %s", ", ".join(names))
    return True


def _exporter(name: str):
    """The exporter an `OTEL_TRACES_EXPORTER` entry names, found by its entry point as the OTel SDK does
    (`otlp`: gRPC, or HTTP when `OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL` is http/protobuf)."""
    if name == "otlp":
        protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        name = "otlp_proto_grpc" if protocol == "grpc" else "otlp_proto_http"
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise ConfigError(f"OTEL_TRACES_EXPORTER: no trace exporter {name!r} installed")
    return next(iter(found)).load()()


def enabled() -> bool:
    return _enabled


def current_trace_id() -> str:
    """The current span's trace id (32 hex digits), for log lines; empty when tracing is off or no span."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


def traceparent(span: Span) -> str:
    """`span`'s W3C traceparent, as the internal calls carry it."""
    carrier: dict[str, str] = {}
    _W3C.inject(carrier, trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def outgoing_traceparent() -> str:
    """What an internal call made here sends as its `traceparent` (empty when tracing is off)."""
    return _outgoing.get()


@contextmanager
def span(name: str, attributes: Mapping[str, AttributeValue] | None = None) -> Iterator[Span | None]:
    """A child span of the current one while tracing is on; nothing (None) while it is off."""
    if not _enabled:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


@contextmanager
def step(name: str, requests: Sequence[Span], attributes: Mapping[str, AttributeValue]) -> Iterator[None]:
    """The span of one engine step serving `requests` (their current spans): a child of the first sampled
    one, linked to every sampled one; the internal calls made inside carry it. Nothing while tracing is off
    or no request is sampled."""
    sampled = [s.get_span_context() for s in requests if s.is_recording()] if _enabled else []
    if not sampled:
        yield
        return
    parent = trace.set_span_in_context(trace.NonRecordingSpan(sampled[0]))
    with tracer.start_as_current_span(name, parent, attributes=attributes, links=[Link(c) for c in sampled]) as current:
        token = _outgoing.set(traceparent(current))
        try:
            yield
        finally:
            _outgoing.reset(token)


@contextmanager
def call_span(name: str, caller: str, attributes: Mapping[str, AttributeValue]) -> Iterator[None]:
    """The span of one internal call, a child of the `caller`'s span (its traceparent); the calls it makes
    carry this span. Nothing while tracing is off or the caller sent no traceparent (an unsampled step)."""
    context = _span_context(caller) if _enabled and caller else None
    if context is None or not context.is_valid:
        yield
        return
    parent = trace.set_span_in_context(trace.NonRecordingSpan(context))
    with tracer.start_as_current_span(name, parent, SpanKind.SERVER, attributes) as current:
        token = _outgoing.set(traceparent(current))
        try:
            yield
        finally:
            _outgoing.reset(token)


@functools.lru_cache(maxsize=1024)
def _span_context(traceparent_: str) -> trace.SpanContext:
    """Parsed once per traceparent: a step's span comes with every MoE layer of the step."""
    return trace.get_current_span(_W3C.extract({"traceparent": traceparent_})).get_span_context()


def extract_metadata(metadata: Iterable[tuple[str, str | bytes]]):
    """The trace context a client sent in its call's metadata (OTel's global propagator: W3C by default)."""
    return propagate.extract({key: value for key, value in metadata if isinstance(value, str)})
