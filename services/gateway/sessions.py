"""Session state in Redis: history, token ids, owner and timestamps, a TTL refreshed on use, a turn lock.

One hash per session (`moemesh:session:{id}`: `meta` JSON and `tokens` as raw int32 bytes) and a
lock key per session, so two turns of one session never interleave: the second gets ABORTED.
Redis being down is UNAVAILABLE for the session calls only; redis-py reconnects on the next call.
"""

import json
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import redis

from moemesh.errors import Aborted, NotFound, Unavailable

_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


@dataclass
class SessionState:
    id: str
    owner: str
    messages: list[dict[str, str]] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # rendered history + last reply, as the KV cache holds it
    turns: int = 0
    created_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    updated_ms: int = 0


def session_key(session_id: str) -> str:
    return f"moemesh:session:{session_id}"


def redis_errors(method: Callable) -> Callable:
    """Redis trouble becomes UNAVAILABLE with the cause."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise Unavailable(f"session store unavailable ({exc}); sessions work again once Redis is back") from None

    return wrapper


class SessionStore:
    def __init__(self, client: redis.Redis, ttl_s: int, lock_ttl_s: int = 300):
        self.redis, self.ttl_s, self.lock_ttl_s = client, ttl_s, lock_ttl_s
        self._release = client.register_script(_RELEASE)

    @staticmethod
    def new_id() -> str:
        return uuid.uuid4().hex

    @redis_errors
    def load(self, session_id: str, owner: str) -> SessionState:
        key = session_key(session_id)
        with self.redis.pipeline() as pipe:
            pipe.hgetall(key).expire(key, self.ttl_s)
            raw, _ = pipe.execute()
        if not raw or raw.get(b"owner", b"").decode() != owner:  # someone else's session is as good as absent
            raise NotFound(f"session_id: no session {session_id!r} (unknown, expired or deleted)")
        meta = json.loads(raw[b"meta"])
        tokens = np.frombuffer(raw[b"tokens"], dtype="<i4").tolist()
        return SessionState(id=session_id, owner=owner, token_ids=tokens, **meta)

    @redis_errors
    def save(self, state: SessionState) -> None:
        state.updated_ms = int(time.time() * 1000)
        meta = {k: v for k, v in asdict(state).items() if k not in ("id", "owner", "token_ids")}
        key = session_key(state.id)
        tokens = np.asarray(state.token_ids, dtype="<i4").tobytes()
        with self.redis.pipeline() as pipe:
            pipe.hset(key, mapping={"owner": state.owner, "meta": json.dumps(meta), "tokens": tokens})
            pipe.expire(key, self.ttl_s)
            pipe.execute()

    @redis_errors
    def ttl(self, session_id: str) -> int:
        return max(0, self.redis.ttl(session_key(session_id)))

    @redis_errors
    def delete(self, state: SessionState, keys: list[str]) -> None:
        self.redis.delete(session_key(state.id), *keys)

    @contextmanager
    def turn_lock(self, session_id: str) -> Iterator[None]:
        """Held for a whole turn; a second turn of the same session meanwhile gets ABORTED."""
        key, token = f"{session_key(session_id)}:lock", uuid.uuid4().hex
        if not redis_errors(self.redis.set)(key, token, nx=True, ex=self.lock_ttl_s):
            raise Aborted(f"session_id: session {session_id!r} has a turn in progress; retry when it ends")
        try:
            yield
        finally:
            try:
                self._release(keys=[key], args=[token])
            except redis.RedisError:
                pass  # the lock expires by itself
