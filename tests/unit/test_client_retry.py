"""The client's retry decisions and error mapping, without a server."""

import grpc
import pytest

from moemesh.client import DeadlineExceeded, MoemeshError, ResourceExhausted, RetryPolicy, Unavailable
from moemesh.client.retry import Attempts
from moemesh.errors import from_rpc_error

pytestmark = pytest.mark.timeout(10)


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: tuple = ()):
        self._code, self._details, self._trailing = code, details, trailing

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple:
        return self._trailing


def test_errors_keep_their_code_and_the_retry_after():
    exhausted = from_rpc_error(
        FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", (("retry-after-ms", "1500"),))
    )
    assert isinstance(exhausted, ResourceExhausted) and exhausted.retry_after_s == 1.5 and str(exhausted) == "slow down"
    assert from_rpc_error(FakeRpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")).retry_after_s is None
    assert isinstance(from_rpc_error(FakeRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, "")), DeadlineExceeded)
    internal = from_rpc_error(FakeRpcError(grpc.StatusCode.INTERNAL, "boom"))
    assert type(internal) is MoemeshError and internal.code == grpc.StatusCode.INTERNAL


def test_backoff_doubles_with_jitter_and_waits_at_least_retry_after():
    policy = RetryPolicy(initial_backoff_s=1, max_backoff_s=4, jitter=0.5)
    down = Unavailable("down")
    for retry, ceiling in enumerate([1, 2, 4, 4]):
        assert ceiling / 2 <= policy.delay(retry, down) <= ceiling
    assert policy.delay(0, ResourceExhausted("quota", retry_after_ms=3000)) >= 3.0


def test_attempts_stop_at_max_attempts_the_deadline_and_final_codes():
    attempts = Attempts(RetryPolicy(max_attempts=2, initial_backoff_s=0.01), timeout_s=None)
    attempts.timeout()
    assert attempts.wait_before_retry(Unavailable("down")) is not None
    assert attempts.wait_before_retry(DeadlineExceeded("late")) is None
    attempts.timeout()
    assert attempts.wait_before_retry(Unavailable("down")) is None  # both attempts made
    short = Attempts(RetryPolicy(initial_backoff_s=5), timeout_s=1)
    assert 0 < short.timeout() <= 1
    assert short.wait_before_retry(Unavailable("down")) is None  # the wait would outlive the deadline
