"""Faults the test suite injects into real services, all in this one module and off unless the service's
environment sets `MOEMESH_FAULTS` (never a flag or setting a user sees).

`MOEMESH_FAULTS` holds comma-separated `name=value` pairs (seconds and factors as numbers):

- `expert_slowdown=F`: once an expert service gets SIGUSR1 (each one toggles), every answer of its `Forward`
  streams takes F times its compute time, as an overloaded or throttled replica would (`SlowAnswers`);
- `expert_load_delay_s=S`: an expert service waits S seconds, serving with health NOT_SERVING, before it loads
  its shard (`delay_load`);
- `engine_crash_after_s=S`: the gateway's engine thread dies with an exception S seconds after the service is
  built, as a bug would kill it (`crash_engine_after`, which in-process tests call directly).
"""

import collections
import functools
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import grpc

from moemesh.errors import ConfigError

ENV = "MOEMESH_FAULTS"


@dataclass(frozen=True)
class Faults:
    expert_slowdown: float = 1.0
    expert_load_delay_s: float = 0.0
    engine_crash_after_s: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "Faults":
        names = [f.name for f in fields(cls)]
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            try:
                if name not in names:
                    raise ValueError
                values[name] = float(value)
            except ValueError:
                raise ConfigError(f"{ENV}: {item!r} is not name=number with a name among {names}") from None
        return cls(**values)


@functools.cache
def active() -> Faults:
    """The faults this process's environment asks for (none without `MOEMESH_FAULTS`)."""
    return Faults.parse(os.environ.get(ENV, ""))


def delay_load() -> None:
    time.sleep(active().expert_load_delay_s)


def expert_interceptors() -> list[grpc.ServerInterceptor]:
    """The interceptors an expert service runs: `SlowAnswers` (toggled by SIGUSR1) when asked for, else none.
    Called from the main thread (it installs the signal handler)."""
    if active().expert_slowdown == 1.0:
        return []
    slow = SlowAnswers(active().expert_slowdown)
    signal.signal(signal.SIGUSR1, lambda *_: slow.toggle())
    return [slow]


class SlowAnswers(grpc.ServerInterceptor):
    """While on, each answer of a bidirectional stream is held back until `factor` times the time from its
    request's arrival (answers come in their requests' order) has passed."""

    def __init__(self, factor: float):
        self.factor, self.on = factor, False

    def toggle(self) -> None:
        self.on = not self.on

    def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        handler = continuation(details)
        if handler is None or not (handler.request_streaming and handler.response_streaming):
            return handler
        return grpc.stream_stream_rpc_method_handler(
            self._slowed(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )

    def _slowed(self, behavior: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]):
        def run(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            arrivals: collections.deque[float] = collections.deque()

            def timed() -> Iterator[Any]:
                for request in requests:
                    arrivals.append(time.monotonic())
                    yield request

            for answer in behavior(timed(), context):
                if arrivals:
                    took = time.monotonic() - arrivals.popleft()
                    if self.on:
                        time.sleep((self.factor - 1) * took)
                yield answer

        return run


def crash_engine_after(engine: Any, seconds: float) -> None:
    """The engine thread dies with an exception `seconds` from now (`Engine.inject_crash`)."""
    timer = threading.Timer(seconds, engine.inject_crash)
    timer.daemon = True
    timer.start()


def arm_engine(engine: Any) -> None:
    """`engine_crash_after_s`, when asked for, counted from now."""
    if active().engine_crash_after_s > 0:
        crash_engine_after(engine, active().engine_crash_after_s)
