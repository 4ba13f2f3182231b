"""Session-scoped checkpoints and clusters shared by the suite."""

import os

# Tests fork children (with preexec_fn, so no vfork) while gRPC threads of other tests' channels run in this
# process; gRPC's fork handlers can then abort the child. The services themselves never fork after gRPC starts.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

from pathlib import Path

import pytest

from tests.helpers import Cluster, RedisServer, make_mixtral


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory) -> Path:
    """Tiny fp32 Mixtral with the real DeepSeek tokenizer (vocab 129280), no sliding window."""
    return make_mixtral(tmp_path_factory.mktemp("mixtral"), tokenizer=True)


@pytest.fixture(scope="session")
def mixtral_window_dir(tmp_path_factory) -> Path:
    """Tiny fp32 Mixtral with an 8-token sliding window, 3 layers, 6 experts, top-2; no tokenizer."""
    return make_mixtral(
        tmp_path_factory.mktemp("mixtral-window"), seed=1, sliding_window=8, num_hidden_layers=3, num_local_experts=6
    )


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real redis-server (AOF, fsync always) of the test module's own, in a fresh directory."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture(scope="session")
def cluster(mixtral_dir) -> Cluster:
    """`moemesh up` on `mixtral_dir`: redis-server, 2 expert shards, router, gateway; fp32 everywhere."""
    c = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32")
    yield c
    c.close()


@pytest.fixture(scope="session")
def window_cluster(mixtral_window_dir) -> Cluster:
    c = Cluster(mixtral_window_dir, "--experts", "3", "--dtype", "float32")
    yield c
    c.close()


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny checkpoint of each non-Mixtral family (see tests/family_checkpoints.py), made lazily."""
    from tests.family_checkpoints import FAMILIES

    class Lazy(dict):
        def __missing__(self, name: str) -> Path:
            self[name] = FAMILIES[name](tmp_path_factory.mktemp(name))
            return self[name]

    return Lazy()
