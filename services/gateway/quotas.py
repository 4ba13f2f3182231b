"""Per-key quotas: request and token rates shared by every gateway replica through Redis, live sessions
per key (Redis), and calls open at once per key (this replica).

Rates are token buckets refilled continuously (capacity: the per-minute budget), updated atomically
by a Lua script on Redis's own clock so that replicas agree. A call is admitted while the key's
request bucket has a request left and its token bucket is not in debt; the tokens a call used
(prompt + completion) are charged when it ends, which may leave the bucket in debt for a while. A
refusal is RESOURCE_EXHAUSTED with the wait until the call would be admitted, in the message and as
`retry-after-ms` trailing metadata.
"""

import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import redis

from moemesh.errors import ResourceExhausted, Unavailable
from moemesh.telemetry import REDIS_ERRORS
from services.gateway.keys import KeyInfo

# KEYS[1]: the bucket; ARGV: capacity, refill per ms, cost, force (1: take even into debt).
# Returns {taken, wait_ms}.
_TAKE = """
local now = redis.call('TIME')
now = now[1] * 1000 + math.floor(now[2] / 1000)
local capacity, rate, cost, force = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4] == '1'
local state = redis.call('HMGET', KEYS[1], 'level', 'at')
local level = tonumber(state[1]) or capacity
local at = tonumber(state[2]) or now
level = math.min(capacity, level + math.max(0, now - at) * rate)
local taken, wait = 1, 0
if cost > level and not force then
  taken, wait = 0, math.ceil((cost - level) / rate)
else
  level = level - cost
end
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil((capacity - math.min(level, 0)) / rate) + 1000)
return {taken, wait}
"""
MINUTE_MS = 60_000


class Quotas:
    def __init__(self, client: redis.Redis | None, session_ttl_s: int):
        self.redis, self.session_ttl_s = client, session_ttl_s
        self._take = client.register_script(_TAKE) if client is not None else None
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def admit(self, key: KeyInfo) -> None:
        """Takes one of the key's requests, if it has one left and its token budget is not in debt."""
        self._bucket(key, "requests", key.requests_per_minute, 1)
        self._bucket(key, "tokens", key.tokens_per_minute, 0)

    def charge(self, key: KeyInfo, tokens: int) -> None:
        """Charges the tokens a finished call used (best effort: Redis may be away)."""
        try:
            self._bucket(key, "tokens", key.tokens_per_minute, tokens, force=True)
        except Unavailable:
            pass

    def _bucket(self, key: KeyInfo, kind: str, per_minute: int, cost: int, force: bool = False) -> None:
        if not per_minute:
            return
        bucket = f"moemesh:quota:{key.id}:{kind}"
        args = [per_minute, per_minute / MINUTE_MS, cost, int(force)]
        taken, wait_ms = self._redis_call(lambda _: self._take(keys=[bucket], args=args))
        if not taken:
            raise ResourceExhausted(
                f"{kind}: key {key.id!r} is over its limit of {per_minute} {kind} per minute; retry in {wait_ms} ms",
                retry_after_ms=wait_ms,
            )

    @contextmanager
    def stream(self, key: KeyInfo) -> Iterator[None]:
        """Holds one of the key's concurrent calls on this gateway for the duration."""
        with self._lock:
            if key.max_streams and self._open[key.id] >= key.max_streams:
                raise ResourceExhausted(
                    f"key {key.id!r} has {self._open[key.id]} calls open on this gateway; "
                    f"its limit (max_streams) is {key.max_streams}"
                )
            self._open[key.id] += 1
        try:
            yield
        finally:
            with self._lock:
                self._open[key.id] -= 1

    def check_new_session(self, key: KeyInfo) -> None:
        """Refuses a new session when the key has `max_sessions` live ones."""
        if not key.max_sessions:
            return
        live = self._redis_call(lambda r: self._live_sessions(r, key))
        if live >= key.max_sessions:
            raise ResourceExhausted(
                f"session_id: key {key.id!r} has {live} live sessions, its limit is {key.max_sessions}; "
                "delete one or let it expire"
            )

    def session_used(self, key: KeyInfo, session_id: str) -> None:
        """Counts the session as the key's until it expires (its TTL from now)."""
        if key.max_sessions:
            expiry = (time.time() + self.session_ttl_s) * 1000
            self._redis_call(lambda r: r.zadd(_sessions_key(key), {session_id: expiry}))

    def session_deleted(self, key: KeyInfo, session_id: str) -> None:
        if key.max_sessions:
            self._redis_call(lambda r: r.zrem(_sessions_key(key), session_id))

    @staticmethod
    def _live_sessions(client: redis.Redis, key: KeyInfo) -> int:
        now_ms = math.floor(time.time() * 1000)
        with client.pipeline() as pipe:
            pipe.zremrangebyscore(_sessions_key(key), "-inf", now_ms).zcard(_sessions_key(key))
            return pipe.execute()[1]

    def _redis_call(self, call: Callable[[redis.Redis], Any]) -> Any:
        if self.redis is None:
            raise Unavailable("per-key rate and session limits need Redis: start the gateway with --redis URL")
        try:
            return call(self.redis)
        except redis.RedisError as exc:
            REDIS_ERRORS.labels(service="gateway", op="quota").inc()  # metrics
            raise Unavailable(f"quota store unavailable ({exc}); retry") from None


def _sessions_key(key: KeyInfo) -> str:
    return f"moemesh:quota:{key.id}:sessions"
