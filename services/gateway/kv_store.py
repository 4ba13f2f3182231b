"""A session's KV cache in Redis, in fixed-size token chunks, so any gateway can continue the session.

Chunk j of a session holds positions [j*C, (j+1)*C) of every layer's cache tensors as raw bytes
(`moemesh:kv:{session}:{j}`) and, written after it in the same pipeline, its metadata
(`...:meta`: model tag, dtype, shapes, the chunk's token ids, byte count, CRC-32). A chunk is used
only if all of that matches the new prompt; anything missing, stale or corrupt ends the reusable
prefix there, and the engine recomputes the rest, so the output never differs from a full recompute.
For sliding-window models only the chunks the next query can still see are stored and loaded.
"""

import json
import zlib

import redis
import torch

from moemesh.model import KVCache
from services.gateway.sessions import redis_errors, session_key


class KVStore:
    def __init__(self, client: redis.Redis, model_tag: str, chunk_tokens: int, ttl_s: int, window: int | None):
        self.redis, self.model_tag, self.chunk, self.ttl_s, self.window = client, model_tag, chunk_tokens, ttl_s, window

    def keys(self, session_id: str, num_tokens: int) -> list[str]:
        return [k for j in range(num_tokens // self.chunk + 1) for k in self._keys(session_id, j)]

    @redis_errors
    def save(self, session_id: str, cache: KVCache, token_ids: list[int], first_chunk: int) -> None:
        """Writes the complete chunks from `first_chunk` on (the earlier ones are already there)."""
        end = cache.length // self.chunk
        first = max(first_chunk, self._first_visible(end * self.chunk))
        with self.redis.pipeline(transaction=False) as pipe:
            for j in range(first, end):
                data = self._chunk_bytes(cache, j)
                meta = {
                    "model": self.model_tag,
                    "dtype": str(cache.layers[0][0].dtype),
                    "tokens": token_ids[j * self.chunk : (j + 1) * self.chunk],
                    "nbytes": len(data),
                    "crc32": zlib.crc32(data),
                }
                data_key, meta_key = self._keys(session_id, j)
                pipe.set(data_key, data, ex=self.ttl_s)
                pipe.set(meta_key, json.dumps(meta), ex=self.ttl_s)
            for j in range(first_chunk):  # kept alive as long as the session
                for key in self._keys(session_id, j):
                    pipe.expire(key, self.ttl_s)
            pipe.execute()

    @redis_errors
    def load(self, session_id: str, prompt: list[int], stored_tokens: list[int], cache: KVCache) -> int:
        """Fills `cache` with the longest valid chunked prefix of `prompt`; returns its length in tokens."""
        limit = min(_common_prefix(prompt, stored_tokens), len(prompt) - 1)  # the last token is always computed
        end = limit // self.chunk  # candidate: chunks [0, end)
        fetched: dict[int, tuple[bytes | None, bytes | None]] = {}
        while end > 0:
            needed = range(self._first_visible(end * self.chunk), end)
            missing = [j for j in needed if j not in fetched]
            if missing:
                keys = [k for j in missing for k in self._keys(session_id, j)]
                values = self.redis.mget(keys)
                fetched |= {j: (values[2 * i], values[2 * i + 1]) for i, j in enumerate(missing)}
            bad = next((j for j in needed if not self._valid(*fetched[j], prompt, j, cache)), None)
            if bad is None:
                for j in needed:
                    self._fill(cache, j, fetched[j][0])
                cache.length = end * self.chunk
                return cache.length
            end = bad
        return 0

    def _first_visible(self, end: int) -> int:
        """First chunk a query at position `end` can still attend to."""
        return max(0, end - self.window + 1) // self.chunk if self.window else 0

    def _keys(self, session_id: str, j: int) -> tuple[str, str]:
        data = f"{session_key(session_id)}:kv:{j}"
        return data, data + ":meta"

    def _chunk_bytes(self, cache: KVCache, j: int) -> bytes:
        rows = slice(j * self.chunk, (j + 1) * self.chunk)
        parts = [t[rows].contiguous().view(torch.uint8).numpy().tobytes() for layer in cache.layers for t in layer]
        return b"".join(parts)

    def _valid(self, data: bytes | None, meta: bytes | None, prompt: list[int], j: int, cache: KVCache) -> bool:
        if data is None or meta is None:
            return False
        try:
            m = json.loads(meta)
        except ValueError:
            return False
        expected_bytes = self.chunk * sum(t[0].numel() * t.element_size() for layer in cache.layers for t in layer)
        return (
            m.get("model") == self.model_tag
            and m.get("dtype") == str(cache.layers[0][0].dtype)
            and m.get("tokens") == prompt[j * self.chunk : (j + 1) * self.chunk]
            and m.get("nbytes") == len(data) == expected_bytes
            and m.get("crc32") == zlib.crc32(data)
        )

    def _fill(self, cache: KVCache, j: int, data: bytes) -> None:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        rows, offset = slice(j * self.chunk, (j + 1) * self.chunk), 0
        for layer in cache.layers:
            for t in layer:
                n = self.chunk * t[0].numel() * t.element_size()
                t[rows] = raw[offset : offset + n].view(t.dtype).view(self.chunk, *t.shape[1:])
                offset += n


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
