"""API keys: who is calling, and what that key may do.

A key is a random secret shown once by `moemesh keys add`; only its SHA-256 is stored, with an id and
optional per-key limits, in a key file or in Redis (hash `moemesh:keys`: SHA-256 -> JSON). A key file
has one key per line, `ID SHA256 [field=value ...]` with `KeyInfo`'s fields (`#` starts a comment), and
is read again when it changes, so `moemesh keys revoke` takes effect within a second on every gateway.
Clients send `authorization: Bearer <key>` metadata.
"""

import dataclasses
import hashlib
import json
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import redis

from moemesh.errors import ConfigError, PermissionDenied, Unauthenticated, Unavailable
from moemesh.telemetry import REDIS_ERRORS

REDIS_KEYS = "moemesh:keys"
RELOAD_AFTER_S = 1.0  # how stale the key file may be seen


@dataclass(frozen=True)
class KeyInfo:
    """A key's id and limits; 0 means unlimited."""

    id: str
    requests_per_minute: int = 0
    tokens_per_minute: int = 0  # prompt + completion tokens
    max_sessions: int = 0  # live sessions the key owns
    max_streams: int = 0  # calls of the key open at once on one gateway
    allow_system: bool = False  # may send `system` chat messages
    allow_priority: bool = False  # may ask for a priority ahead of the default (a negative value)

    def check_priority(self, priority: int) -> None:
        if priority < 0 and not self.allow_priority:
            raise PermissionDenied(f"priority: {priority} is ahead of the default 0, which this key may not ask for")

    def fields(self) -> str:
        """The limits as `field=value` words, leaving out the defaults."""
        default = KeyInfo(self.id)
        return " ".join(
            f"{f.name}={str(v).lower() if isinstance(v, bool) else v}"
            for f in dataclasses.fields(self)
            if f.name != "id" and (v := getattr(self, f.name)) != getattr(default, f.name)
        )


ANONYMOUS = KeyInfo("anonymous", allow_system=True, allow_priority=True)  # every caller when no keys are configured


def new_secret() -> str:
    return "mm_" + secrets.token_urlsafe(32)


def digest(secret: str) -> str:
    """Keys are 256 random bits, so a plain SHA-256 is enough to make a stolen key file useless."""
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_fields(id_: str, words: list[str]) -> KeyInfo:
    """`KeyInfo` from `field=value` words (the CLI's and the key file's)."""
    types = {f.name: f.type for f in dataclasses.fields(KeyInfo)}
    values: dict[str, object] = {}
    for word in words:
        name, _, value = word.partition("=")
        if name not in types or name == "id" or not value:
            raise ConfigError(f"key {id_}: {word!r} is not one of {', '.join(list(types)[1:])}=VALUE")
        try:
            values[name] = value.lower() in ("true", "yes", "1") if types[name] is bool else int(value)
        except ValueError:
            raise ConfigError(f"key {id_}: {word!r} needs a whole number") from None
    return KeyInfo(id_, **values)


class KeyStore(Protocol):
    def lookup(self, digest_: str) -> KeyInfo | None: ...

    def add(self, info: KeyInfo) -> str: ...

    def list(self) -> list[KeyInfo]: ...

    def revoke(self, id_: str) -> bool: ...


class KeyFile:
    """Keys in a text file; see the module docstring for the format."""

    def __init__(self, path: Path):
        self.path = path
        self._keys: dict[str, KeyInfo] = {}
        self._mtime: float | None = None
        self._checked = -RELOAD_AFTER_S
        self._lock = threading.Lock()

    def lookup(self, digest_: str) -> KeyInfo | None:
        with self._lock:
            if time.monotonic() - self._checked >= RELOAD_AFTER_S:
                self._reload()
            return self._keys.get(digest_)

    def _reload(self) -> None:
        self._checked = time.monotonic()
        try:
            mtime = self.path.stat().st_mtime
        except OSError as exc:
            raise ConfigError(f"api_keys: cannot read {self.path} ({exc.strerror})") from None
        if mtime != self._mtime:
            self._keys, self._mtime = self._read(), mtime

    def _read(self) -> dict[str, KeyInfo]:
        keys = {}
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            words = line.split("#", 1)[0].split()
            if not words:
                continue
            if len(words) < 2 or len(words[1]) != 64:
                raise ConfigError(f"api_keys: {self.path} line {n}: expected `ID SHA256 [field=value ...]`")
            keys[words[1]] = parse_fields(words[0], words[2:])
        return keys

    def add(self, info: KeyInfo) -> str:
        if any(k.id == info.id for k in self.list()):
            raise ConfigError(f"key {info.id}: already exists; revoke it first")
        secret = new_secret()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{info.id} {digest(secret)} {info.fields()}".rstrip() + "\n")
        return secret

    def list(self) -> list[KeyInfo]:
        return list(self._read().values()) if self.path.exists() else []

    def revoke(self, id_: str) -> bool:
        lines = self.path.read_text().splitlines(keepends=True) if self.path.exists() else []
        kept = [line for line in lines if line.split("#", 1)[0].split()[:1] != [id_]]
        self.path.write_text("".join(kept))
        return len(kept) < len(lines)


class RedisKeys:
    """Keys in the Redis hash `moemesh:keys`, shared by every gateway on that Redis."""

    def __init__(self, client: redis.Redis):
        self.redis = client

    def lookup(self, digest_: str) -> KeyInfo | None:
        raw = self.redis.hget(REDIS_KEYS, digest_)
        return KeyInfo(**json.loads(raw)) if raw else None

    def add(self, info: KeyInfo) -> str:
        if any(k.id == info.id for k in self.list()):
            raise ConfigError(f"key {info.id}: already exists; revoke it first")
        secret = new_secret()
        self.redis.hset(REDIS_KEYS, digest(secret), json.dumps(dataclasses.asdict(info)))
        return secret

    def list(self) -> list[KeyInfo]:
        return [KeyInfo(**json.loads(v)) for v in self.redis.hgetall(REDIS_KEYS).values()]

    def revoke(self, id_: str) -> bool:
        gone = [d for d, v in self.redis.hgetall(REDIS_KEYS).items() if json.loads(v)["id"] == id_]
        return bool(gone) and bool(self.redis.hdel(REDIS_KEYS, *gone))


class Authenticator:
    """Maps a call's `authorization` metadata to its key; everyone is ANONYMOUS when there is no store."""

    def __init__(self, store: KeyStore | None):
        self.store = store

    def authenticate(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> KeyInfo:
        if self.store is None:
            return ANONYMOUS
        header = next((v for k, v in metadata or () if k == "authorization"), None)
        if not isinstance(header, str) or not header.startswith("Bearer "):
            raise Unauthenticated("authorization: send `authorization: Bearer <API key>` metadata")
        try:
            info = self.store.lookup(digest(header.removeprefix("Bearer ").strip()))
        except redis.RedisError as exc:
            REDIS_ERRORS.labels(service="gateway", op="key_lookup").inc()  # metrics
            raise Unavailable(f"the API key store is unavailable ({exc}); retry") from None
        if info is None:
            raise Unauthenticated("authorization: unknown or revoked API key")
        return info
