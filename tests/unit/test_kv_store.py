"""A KV cache saved to Redis and loaded back, on the CPU and (where there is one) on a GPU: the same values,
the device's cache filled in place."""

import pytest
import torch

from moemesh.checkpoint import Checkpoint
from moemesh.model import KVCache
from services.gateway.kv_store import KVStore, load_client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

CHUNK = 4
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


@pytest.mark.parametrize("device", DEVICES)
def test_a_cache_comes_back_with_its_values_on_its_device(mixtral_dir, redis_server, device):
    cfg = Checkpoint(mixtral_dir).config
    store = KVStore(redis_server.client(), load_client(redis_server.url), "tag", CHUNK, ttl_s=60, window=None)
    tokens = list(range(10, 21))  # 11 positions: chunks of 4, 4 and a partial 3
    saved = KVCache(cfg, torch.float32, torch.device(device))
    saved.reserve(len(tokens))
    for layer in saved.layers:
        for t in layer:
            t[: len(tokens)] = torch.randn(len(tokens), *t.shape[1:])
    saved.length = len(tokens)
    store.save(f"kv-{device}", saved, tokens, cached=0)

    loaded = KVCache(cfg, torch.float32, torch.device(device))
    assert store.load(f"kv-{device}", [*tokens, 99], tokens, loaded) == len(tokens) - 1  # the last is recomputed
    assert loaded.device.type == device and loaded.length == len(tokens) - 1
    for before, after in zip(saved.layers, loaded.layers, strict=True):
        for a, b in zip(before, after, strict=True):
            assert torch.equal(a[: loaded.length], b[: loaded.length])
