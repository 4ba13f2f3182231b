"""The gateway's spans: one server span per public call, and each generation's phases in the engine.

A call's trace id goes back to the client in the initial metadata `x-trace-id` (so a stream has it
before its first message), and into a log line when the call ends. The engine's phases are spans of
their own, children of the call's: `gateway.admission` (waiting for a place in the running batch),
`gateway.prefill` (until the first token) and `gateway.decode` (the rest: one span per request, with
token counts and timings as attributes, never one per token).
"""

import time
from collections.abc import Callable, Iterator

import grpc
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from moemesh import tracing
from moemesh.errors import MoemeshError

TRACE_ID_METADATA = "x-trace-id"


class ServerSpans(grpc.ServerInterceptor):
    """A server span around every call of the services whose names start with `prefix`."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        method = details.method.lstrip("/")
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary, method), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _stream(handler.unary_stream, method), handler.request_deserializer, handler.response_serializer
            )
        return handler


def _server_span(method: str, context: grpc.ServicerContext):
    service, _, name = method.partition("/")
    return tracing.tracer.start_as_current_span(
        method,
        tracing.extract_metadata(context.invocation_metadata()),
        SpanKind.SERVER,
        {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )


def _announce(context: grpc.ServicerContext) -> None:
    """The trace id to the client; the call's JSON log line (`observe.py`) records it too."""
    context.send_initial_metadata(((TRACE_ID_METADATA, tracing.current_trace_id()),))


def _unary(behavior: Callable, method: str) -> Callable:
    def run(request, context: grpc.ServicerContext):
        with _server_span(method, context):
            _announce(context)
            return behavior(request, context)

    return run


def _stream(behavior: Callable, method: str) -> Callable:
    # gRPC runs a response stream in one worker thread from start to end, so the span stays current in it.
    def run(request, context: grpc.ServicerContext) -> Iterator:
        with _server_span(method, context):
            _announce(context)
            yield from behavior(request, context)

    return run


class RequestTrace:
    """One generation's phase spans, ended from the engine's thread as the request moves on; `phase` is
    the current one, which the spans of the engine steps the request is in link to."""

    def __init__(self, parent: Context, prompt_tokens: int, cached_tokens: int):
        self.parent, self.prompt_tokens, self.cached_tokens = parent, prompt_tokens, cached_tokens
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.phase: Span = self._start("gateway.admission")

    @classmethod
    def begin(cls, prompt_tokens: int, cached_tokens: int) -> "RequestTrace | None":
        """The trace of a request submitted from the calling thread (its span is the parent); None when off."""
        if not tracing.enabled():
            return None
        return cls(trace.set_span_in_context(trace.get_current_span()), prompt_tokens, cached_tokens)

    def _start(self, name: str, **attributes) -> Span:
        return tracing.tracer.start_span(name, self.parent, attributes=attributes)

    def admitted(self, running: int) -> None:
        self.phase.set_attribute("moemesh.running_sequences", running)
        self.phase.end()
        counts = {"moemesh.prompt_tokens": self.prompt_tokens, "moemesh.cached_tokens": self.cached_tokens}
        self.phase = self._start("gateway.prefill", **counts)

    def sampled(self, generated: int) -> None:
        """After each sampled token; the first ends the prefill."""
        if generated != 1:
            return
        self.first_token_at = time.monotonic()
        self.phase.set_attribute("moemesh.time_to_first_token_ms", 1000 * (self.first_token_at - self.submitted))
        self.phase.end()
        self.phase = self._start("gateway.decode")

    def ended(self, completion_tokens: int, finish_reason: str = "", error: MoemeshError | None = None) -> None:
        span = self.phase
        if self.first_token_at is not None:  # the decode span
            seconds = time.monotonic() - self.first_token_at
            decoded = completion_tokens - 1  # the first token came from the prefill
            span.set_attributes(
                {
                    "moemesh.completion_tokens": completion_tokens,
                    "moemesh.decode_tokens": decoded,
                    "moemesh.decode_ms": 1000 * seconds,
                    "moemesh.decode_tokens_per_s": decoded / seconds if seconds > 0 else 0.0,
                }
            )
        if finish_reason:
            span.set_attribute("moemesh.finish_reason", finish_reason)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, f"{error.code.name}: {error}"))
        span.end()
