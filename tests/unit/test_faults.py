"""Fault injection (`moemesh.faults`): off without `MOEMESH_FAULTS`, refused when malformed, and the slow-answer
interceptor holds each streamed answer back in proportion to its own call's time."""

import time

import grpc
import pytest

from moemesh import faults
from moemesh.errors import ConfigError
from moemesh.faults import Faults, SlowAnswers

pytestmark = pytest.mark.timeout(30)


def test_no_variable_means_no_faults():
    assert Faults.parse("") == Faults()


def test_faults_parse_and_refuse_with_the_names():
    assert Faults.parse("expert_slowdown=10, engine_crash_after_s=2.5") == Faults(10.0, 0.0, 2.5)
    for bad in ("expert_slowdown", "slowdown=2", "expert_load_delay_s=soon"):
        with pytest.raises(ConfigError, match=r"MOEMESH_FAULTS: .* is not name=number with a name among"):
            Faults.parse(bad)


def _stream(interceptor: SlowAnswers, work_s: float, calls: int) -> list[float]:
    """Seconds each answer of one bidirectional stream took, through the interceptor."""

    def behavior(requests, context):
        for request in requests:
            time.sleep(work_s)
            yield request

    handler = grpc.stream_stream_rpc_method_handler(behavior)
    wrapped = interceptor.intercept_service(lambda details: handler, None)
    took, last = [], time.monotonic()
    for _ in wrapped.stream_stream(iter(range(calls)), None):
        took.append(time.monotonic() - last)
        last = time.monotonic()
    return took


def test_slow_answers_take_the_factor_times_their_call_only_while_on():
    slow = SlowAnswers(5.0)
    assert max(_stream(slow, 0.02, 3)) < 0.09  # off: as fast as the work
    slow.toggle()
    assert min(_stream(slow, 0.02, 3)) >= 0.1  # on: 5 x 20 ms each
    slow.toggle()
    assert max(_stream(slow, 0.02, 3)) < 0.09


def test_unary_handlers_pass_through():
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    assert SlowAnswers(5.0).intercept_service(lambda details: handler, None) is handler


def test_the_engine_hook_fires_after_the_delay():
    class Engine:
        crashed_at = None

        def inject_crash(self):
            self.crashed_at = time.monotonic()

    engine, start = Engine(), time.monotonic()
    faults.crash_engine_after(engine, 0.05)
    deadline = time.monotonic() + 5
    while engine.crashed_at is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert engine.crashed_at - start >= 0.05
