"""`moemesh keys add|list|revoke`: API keys in a key file or in Redis (`services.gateway.keys`), edited by the
same code the gateway reads them with."""

from pathlib import Path

import redis

from moemesh.errors import ConfigError
from services.gateway.keys import KeyFile, KeyStore, RedisKeys, parse_fields


def run_keys(action: str, key_id: str | None, limits: list[str], file: Path | None, redis_url: str | None) -> int:
    store: KeyStore = KeyFile(file) if file else RedisKeys(redis.Redis.from_url(redis_url, socket_timeout=5))
    try:
        return _run(store, action, key_id, limits)
    except redis.RedisError as exc:
        raise ConfigError(f"keys {action}: Redis at {redis_url}: {exc}") from None


def _run(store: KeyStore, action: str, key_id: str | None, limits: list[str]) -> int:
    if action == "list":
        for info in store.list():
            print(f"{info.id} {info.fields()}".rstrip())
        return 0
    if not key_id:
        raise ConfigError(f"keys {action}: name the key's id")
    if action == "add":
        secret = store.add(parse_fields(key_id, limits))
        print(secret)  # shown once: only its hash is stored
        return 0
    if limits:
        raise ConfigError("keys revoke: takes only the key's id")
    if not store.revoke(key_id):
        raise ConfigError(f"keys revoke: no key {key_id!r}")
    print(f"revoked {key_id}")
    return 0
