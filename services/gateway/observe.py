"""Per-call accounting of Gateway calls: `moemesh_requests_total{method,code}` and one JSON log line per call.

`observed("Generate")` wraps a servicer method (inside `map_errors`) and records the call's final status:
OK, the code of the `MoemeshError` it raised (INVALID_ARGUMENT, UNAUTHENTICATED, ...), CANCELLED when the
client went away mid-stream, INTERNAL for anything else. The method fills the call's `CallRecord`
(`record(context)`): the key id once authenticated, token counts and the first token's time from its outputs.

The log line (logger `moemesh.requests`, JSON on stderr) never holds a prompt, a message or generated text:
only ids, the method, the status code, token counts and times.
"""

import functools
import inspect
import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from moemesh.errors import MoemeshError
from services.gateway import metrics
from services.gateway.requests import StepOutput

request_log = logging.getLogger("moemesh.requests")


class _StderrHandler(logging.Handler):
    """Writes each record's message as one line to the current `sys.stderr`."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


if not request_log.handlers:
    request_log.addHandler(_StderrHandler())
    request_log.setLevel(logging.INFO)
    request_log.propagate = False  # the JSON line alone, not again through the root logger's format


def trace_id() -> str:
    """The current trace's id, once tracing exists (`moemesh.tracing`); "" without it."""
    try:
        from moemesh.tracing import current_trace_id  # type: ignore[import-not-found]
    except ImportError:
        return ""
    return current_trace_id()


@dataclass
class CallRecord:
    method: str
    started: float = field(default_factory=time.monotonic)
    key_id: str = ""  # "" until the call's key is known (a call refused before that: UNAUTHENTICATED, ...)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    first_token_at: float | None = None
    trace_id: str = ""  # the call's trace, taken as soon as a span is current (see `saw`, `finish`)

    def saw(self, output: StepOutput) -> None:
        """Takes the times and counts of one of the call's outputs."""
        self.trace_id = self.trace_id or trace_id()
        if self.first_token_at is None and output.token_ids:
            self.first_token_at = time.monotonic()
        if output.finish_reason:
            self.prompt_tokens, self.completion_tokens = output.prompt_tokens, output.completion_tokens
            self.cached_tokens = output.cached_tokens

    def finish(self, code: str) -> None:
        metrics.REQUESTS.labels(method=self.method, code=code).inc()
        now = time.monotonic()
        line = {
            "trace_id": self.trace_id or trace_id(),
            "key_id": self.key_id,
            "method": self.method,
            "code": code,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "ttft_s": None if self.first_token_at is None else round(self.first_token_at - self.started, 6),
            "total_s": round(now - self.started, 6),
        }
        request_log.info(json.dumps(line, separators=(",", ":")))


_records: dict[int, CallRecord] = {}  # by id(context), while the call runs
_lock = threading.Lock()


def record(context: grpc.ServicerContext) -> CallRecord:
    """The running call's record (a throwaway one outside `observed`)."""
    with _lock:
        return _records.get(id(context)) or CallRecord("")


def _code(exc: BaseException) -> str:
    if isinstance(exc, MoemeshError):
        return exc.code.name
    if isinstance(exc, GeneratorExit):
        return "CANCELLED"  # the client went away (or the server stopped) while the reply streamed
    return grpc.StatusCode.INTERNAL.name


def observed(method_name: str) -> Callable[[Callable], Callable]:
    def wrap(method: Callable) -> Callable:
        def begin(context) -> CallRecord:
            rec = CallRecord(method_name, trace_id=trace_id())
            with _lock:
                _records[id(context)] = rec
            return rec

        def end(context, rec: CallRecord, code: str) -> None:
            with _lock:
                _records.pop(id(context), None)
            rec.finish(code)

        if inspect.isgeneratorfunction(method):

            @functools.wraps(method)
            def stream(self, request, context):
                rec, code = begin(context), "OK"
                try:
                    yield from method(self, request, context)
                except BaseException as exc:
                    code = _code(exc)
                    raise
                finally:
                    end(context, rec, code)

            return stream

        @functools.wraps(method)
        def unary(self, request, context):
            rec, code = begin(context), "OK"
            try:
                return method(self, request, context)
            except BaseException as exc:
                code = _code(exc)
                raise
            finally:
                end(context, rec, code)

        return unary

    return wrap
