"""A session's KV cache in Redis, in token chunks, so any gateway replica can continue the session.

Chunk j of a session holds positions [j*C, min((j+1)*C, L)) of every layer's cache tensors as raw
bytes (`moemesh:session:{id}:kv:{j}`; the last chunk may be partial and is rewritten as it grows)
and, written after it in the same pipeline, its metadata (`...:meta`: model tag, dtype, the chunk's
token ids, byte count, CRC-32). A chunk is used only if all of that matches the new prompt; anything
missing, stale or corrupt ends the reusable prefix there and the engine recomputes the rest, so the
output never differs from a full recompute. For sliding-window models only the chunks the next query
can still see are stored and loaded. Loading never fails a turn: chunks come LOAD_BATCH_CHUNKS per
round trip within a time budget, and a Redis error, a timeout or the budget running out end the
reusable prefix at what has arrived.

A cache on a GPU crosses to host memory in one batch each way: a save queues a copy of every layer's rows
to store and waits once; a load fills pinned host buffers and queues their copies to the device, which the
engine's next kernels are ordered after. A cache on the CPU is read and filled in place.
"""

import json
import logging
import math
import time
import zlib
from collections.abc import Callable
from functools import partial

import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from moemesh.model import KVCache
from moemesh.telemetry import REDIS_ERRORS
from moemesh.tls import PLAINTEXT, Tls
from services.gateway.sessions import redis_errors, session_key

log = logging.getLogger(__name__)

LOAD_BATCH_CHUNKS = 8  # chunks per MGET when loading
LOAD_BUDGET_S = 2.0  # time a turn may spend loading its KV cache; what has not arrived by then is recomputed

Chunk = tuple[bytes | None, bytes | None]  # data and metadata, None where missing


def load_client(url: str, tls: Tls = PLAINTEXT, budget_s: float = LOAD_BUDGET_S) -> redis.Redis:
    """A client for KV loads: no retries and timeouts of the load budget, so a slow or hung Redis costs a
    turn about the budget, then it recomputes."""
    return tls.redis(url, socket_timeout=budget_s, socket_connect_timeout=budget_s, retry=Retry(NoBackoff(), 0))


class KVStore:
    """Saves through `client`; loads through `loads`, from `load_client`."""

    def __init__(
        self,
        client: redis.Redis,
        loads: redis.Redis,
        model_tag: str,
        chunk_tokens: int,
        ttl_s: int,
        window: int | None,
        load_budget_s: float = LOAD_BUDGET_S,
    ):
        self.redis, self.loads, self.model_tag, self.ttl_s, self.window = client, loads, model_tag, ttl_s, window
        self.chunk, self.load_budget_s = chunk_tokens, load_budget_s

    def keys(self, session_id: str, num_tokens: int) -> list[str]:
        return [k for j in range(math.ceil(num_tokens / self.chunk) + 1) for k in self._keys(session_id, j)]

    @redis_errors
    def save(self, session_id: str, cache: KVCache, token_ids: list[int], cached: int) -> None:
        """Writes the chunks from the one holding position `cached` on (the earlier ones are stored)."""
        first_chunk = cached // self.chunk
        first = max(first_chunk, self._first_visible(cache.length))
        base = first * self.chunk
        host = _on_host(cache, base, cache.length)
        with self.redis.pipeline(transaction=False) as pipe:
            for j in range(first, math.ceil(cache.length / self.chunk)):
                rows = range(j * self.chunk, min((j + 1) * self.chunk, cache.length))
                data = b"".join(_rows_bytes(t, rows.start - base, rows.stop - base) for layer in host for t in layer)
                meta = {
                    "model": self.model_tag,
                    "dtype": str(cache.layers[0][0].dtype),
                    "tokens": token_ids[rows.start : rows.stop],
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

    def load(self, session_id: str, prompt: list[int], stored_tokens: list[int], cache: KVCache) -> int:
        """Fills `cache` with the longest valid stored prefix of `prompt`; returns its length in tokens."""
        # The prompt's last token is always computed; the stored sequence's last token never was.
        end = min(_common_prefix(prompt, stored_tokens), len(prompt) - 1, len(stored_tokens) - 1)
        chunks = _ChunkFetcher(
            self.loads, partial(self._keys, session_id), math.ceil(end / self.chunk), self.load_budget_s
        )
        while end > 0:
            needed = range(self._first_visible(end), math.ceil(end / self.chunk))
            bad = next((j for j in needed if not self._valid(*chunks.get(j), prompt, j, end, cache)), None)
            if bad is None:
                cache.reserve(end)
                base = needed.start * self.chunk
                host = _host_buffers(cache, base, end)
                for j in needed:
                    self._fill(host, j * self.chunk - base, end - j * self.chunk, chunks.get(j))
                _to_device(host, cache, base, end)
                cache.length = end
                return end
            end = bad * self.chunk
        return 0

    def _first_visible(self, end: int) -> int:
        """First chunk a query at position `end` can still attend to."""
        return max(0, end - self.window + 1) // self.chunk if self.window else 0

    def _keys(self, session_id: str, j: int) -> tuple[str, str]:
        data = f"{session_key(session_id)}:kv:{j}"
        return data, data + ":meta"

    def _valid(self, data: bytes | None, meta: bytes | None, prompt: list[int], j: int, end: int, cache: KVCache):
        """The chunk is intact, of this model, and covers the prompt's tokens up to `end` (or its whole span)."""
        if data is None or meta is None:
            return False
        try:
            m = json.loads(meta)
        except ValueError:
            return False
        tokens = m.get("tokens") or []
        start = j * self.chunk
        used = min(len(tokens), end - start)
        return (
            m.get("model") == self.model_tag
            and m.get("dtype") == str(cache.layers[0][0].dtype)
            and used == min(self.chunk, end - start)
            and tokens[:used] == prompt[start : start + used]
            and m.get("nbytes") == len(data) == len(tokens) * cache.position_bytes
            and m.get("crc32") == zlib.crc32(data)
        )

    @staticmethod
    def _fill(host: list[tuple[torch.Tensor, ...]], start: int, room: int, chunk: Chunk) -> None:
        """Writes a valid chunk's rows, at most `room` of them, at row `start` of every layer's buffers."""
        data, meta = chunk
        stored = len(json.loads(meta)["tokens"])
        used = min(stored, room)
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        offset = 0
        for layer in host:
            for t in layer:
                n = stored * t[0].numel() * t.element_size()
                rows = raw[offset : offset + n].view(t.dtype).view(stored, *t.shape[1:])
                t[start : start + used] = rows[:used]
                offset += n


class _ChunkFetcher:
    """One load's chunks, fetched on first use LOAD_BATCH_CHUNKS at a time within the load budget.

    After a Redis error, or once the budget is spent, nothing more is fetched: the chunks not yet
    fetched read as missing, which ends the reusable prefix before them.
    """

    def __init__(self, client: redis.Redis, keys: Callable[[int], tuple[str, str]], count: int, budget_s: float):
        self.client, self.keys, self.count = client, keys, count
        self.deadline = time.monotonic() + budget_s
        self.fetched: dict[int, Chunk] = {}
        self.stopped = False

    def get(self, j: int) -> Chunk:
        if j not in self.fetched and not self.stopped:
            self._fetch([k for k in range(j, min(j + LOAD_BATCH_CHUNKS, self.count)) if k not in self.fetched])
        return self.fetched.get(j, (None, None))

    def _fetch(self, batch: list[int]) -> None:
        if time.monotonic() >= self.deadline:
            self._stop(batch[0], "out of time")
            return
        try:
            values = self.client.mget([key for j in batch for key in self.keys(j)])
        except redis.RedisError as exc:
            REDIS_ERRORS.labels(service="gateway", op="kv_load").inc()  # metrics
            self._stop(batch[0], str(exc))
            return
        self.fetched |= {j: (values[2 * i], values[2 * i + 1]) for i, j in enumerate(batch)}

    def _stop(self, j: int, why: str) -> None:
        log.warning("KV load stopped at %s (%s); the rest is recomputed", self.keys(j)[0], why)
        self.stopped = True


def _on_host(cache: KVCache, start: int, end: int) -> list[tuple[torch.Tensor, ...]]:
    """Rows [start, end) of every layer's tensors in host memory: views of a CPU cache; from a GPU, every copy
    queued (into pinned memory), then one wait for them all."""
    host = [tuple(t[start:end].to("cpu", non_blocking=True) for t in layer) for layer in cache.layers]
    if cache.device.type != "cpu":
        torch.accelerator.synchronize(cache.device)
    return host


def _host_buffers(cache: KVCache, start: int, end: int) -> list[tuple[torch.Tensor, ...]]:
    """Where a load writes rows [start, end) of every layer: the cache itself on the CPU, else pinned buffers
    that `_to_device` copies into it."""
    if cache.device.type == "cpu":
        return [tuple(t[start:end] for t in layer) for layer in cache.layers]
    return [
        tuple(torch.empty((end - start, *t.shape[1:]), dtype=t.dtype, pin_memory=True) for t in layer)
        for layer in cache.layers
    ]


def _to_device(host: list[tuple[torch.Tensor, ...]], cache: KVCache, start: int, end: int) -> None:
    """Queues the copies of `_host_buffers` into the cache (nothing to do on the CPU: they are the cache)."""
    if cache.device.type == "cpu":
        return
    for layer, buffers in zip(cache.layers, host, strict=True):
        for t, buffer in zip(layer, buffers, strict=True):
            t[start:end].copy_(buffer, non_blocking=True)


def _rows_bytes(t: torch.Tensor, start: int, stop: int) -> bytes:
    return t[start:stop].contiguous().view(torch.uint8).numpy().tobytes()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
