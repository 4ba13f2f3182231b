"""When to try a call again, and after how long: shared by the sync and the asyncio client, which differ only
in how they sleep."""

import random
import time
from dataclasses import dataclass

import grpc

from moemesh.errors import MoemeshError, ResourceExhausted

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter on UNAVAILABLE (gateway down or restarting) and RESOURCE_EXHAUSTED
    (queue full, over quota).

    The n-th wait (n from 0) is a random share between `1 - jitter` and 1 of `initial_backoff_s *
    multiplier**n` (at most `max_backoff_s`), so that clients refused together do not come back together; a
    refusal with `retry-after-ms` waits at least that long. No retry outlives the call's deadline: the last
    error is raised instead. `max_attempts=1` never retries."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.25
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5

    def delay(self, retry: int, error: MoemeshError) -> float:
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        delay = backoff * random.uniform(1 - self.jitter, 1)
        if isinstance(error, ResourceExhausted) and error.retry_after_s is not None:
            delay = max(delay, error.retry_after_s)
        return delay


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(max_attempts=1)


class Attempts:
    """The attempts of one call: each one's timeout (what is left of the call's deadline) and the wait before
    the next, or None when the error is final."""

    def __init__(self, policy: RetryPolicy, timeout_s: float | None):
        self.policy = policy
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s
        self.made = 0

    def timeout(self) -> float | None:
        """The gRPC timeout of the next attempt."""
        self.made += 1
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def wait_before_retry(self, error: MoemeshError) -> float | None:
        if error.code not in RETRYABLE or self.made >= self.policy.max_attempts:
            return None
        delay = self.policy.delay(self.made - 1, error)
        if self.deadline is not None and time.monotonic() + delay >= self.deadline:
            return None
        return delay
