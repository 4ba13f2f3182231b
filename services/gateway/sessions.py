"""Session state in Redis: history, token ids, owner and timestamps, a TTL refreshed on use, a turn lock.

One hash per session (`moemesh:session:{id}`: `meta` JSON and `tokens` as raw int32 bytes) and a
lock key per session, so two turns of one session never interleave: the second gets ABORTED. The
lock expires seconds after its holder stops renewing it (a crashed gateway frees the session quickly)
and its value is a fencing token: a turn that lost its lock can no longer write the session.
Redis being down is UNAVAILABLE for the session calls only; redis-py reconnects on the next call.
"""

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import redis

from moemesh.errors import Aborted, NotFound, Unavailable
from moemesh.telemetry import REDIS_ERRORS

log = logging.getLogger(__name__)

# Lock scripts: KEYS[1] is the lock, ARGV[1] the holder's token; each acts only if the token still holds it.
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)
# KEYS[2] is the session hash; ARGV[2..5]: owner, meta, tokens, TTL in seconds.
_FENCED_SAVE = """
if redis.call('get', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('hset', KEYS[2], 'owner', ARGV[2], 'meta', ARGV[3], 'tokens', ARGV[4])
redis.call('expire', KEYS[2], ARGV[5])
return 1
"""


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


def lock_key(session_id: str) -> str:
    return f"{session_key(session_id)}:lock"


@dataclass
class TurnLock:
    """One turn's hold on its session; `token` fences the turn's writes (see `SessionStore.save`)."""

    session_id: str
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    released: threading.Event = field(default_factory=threading.Event)


def redis_errors(method: Callable) -> Callable:
    """Redis trouble becomes UNAVAILABLE with the cause."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            REDIS_ERRORS.labels(service="gateway", op=getattr(method, "__name__", "call")).inc()  # metrics
            raise Unavailable(f"session store unavailable ({exc}); sessions work again once Redis is back") from None

    return wrapper


class SessionStore:
    def __init__(self, client: redis.Redis, ttl_s: int, lock_ttl_s: float):
        self.redis, self.ttl_s, self.lock_ttl_s = client, ttl_s, lock_ttl_s
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._fenced_save = client.register_script(_FENCED_SAVE)

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
    def save(self, state: SessionState, lock: TurnLock) -> None:
        """Writes the session only while `lock` holds it, so a turn that lost its lock (it expired, and
        perhaps another turn took it) cannot overwrite what the next holder saves."""
        state.updated_ms = int(time.time() * 1000)
        meta = {k: v for k, v in asdict(state).items() if k not in ("id", "owner", "token_ids")}
        tokens = np.asarray(state.token_ids, dtype="<i4").tobytes()
        keys = [lock_key(state.id), session_key(state.id)]
        if not self._fenced_save(keys=keys, args=[lock.token, state.owner, json.dumps(meta), tokens, self.ttl_s]):
            raise Aborted(
                f"session_id: this turn lost its lock on session {state.id!r} (it expired or another turn took it)"
            )

    @redis_errors
    def ttl(self, session_id: str) -> int:
        return max(0, self.redis.ttl(session_key(session_id)))

    @redis_errors
    def delete(self, state: SessionState, keys: list[str]) -> None:
        self.redis.delete(session_key(state.id), *keys)

    @contextmanager
    def turn_lock(self, session_id: str) -> Iterator[TurnLock]:
        """Held for a whole turn; a second turn of the same session meanwhile gets ABORTED.

        The lock expires `lock_ttl_s` after its last renewal; a thread renews it every third of that
        while the turn runs, so a long turn keeps it and a crashed gateway's lock goes within seconds.
        """
        lock = TurnLock(session_id)
        if not redis_errors(self.redis.set)(lock_key(session_id), lock.token, nx=True, px=self._lock_ttl_ms):
            raise Aborted(f"session_id: session {session_id!r} has a turn in progress; retry when it ends")
        threading.Thread(target=self._keep, args=(lock,), name=f"turn-lock-{session_id}", daemon=True).start()
        try:
            yield lock
        finally:
            lock.released.set()
            try:
                self._release(keys=[lock_key(session_id)], args=[lock.token])
            except redis.RedisError:
                pass  # the lock expires by itself

    @property
    def _lock_ttl_ms(self) -> int:
        return int(self.lock_ttl_s * 1000)

    def _keep(self, lock: TurnLock) -> None:
        """Renews `lock` every third of its TTL until it is released or lost."""
        while not lock.released.wait(self.lock_ttl_s / 3):
            try:
                if not self._renew(keys=[lock_key(lock.session_id)], args=[lock.token, self._lock_ttl_ms]):
                    log.warning("turn lock of session %s lost; the turn will not be saved", lock.session_id)
                    return
            except redis.RedisError as exc:  # try again at the next tick, before the lock expires
                log.warning("turn lock of session %s not renewed: %s", lock.session_id, exc)
