"""`moemesh up`'s torch threads and OpenMP settings per service."""

from pathlib import Path

import pytest

from moemesh import hardware
from moemesh.launcher import ClusterSpec

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("cores", "experts", "replicas", "gateway", "others"),
    [(2, 2, 1, 2, 1), (8, 2, 1, 8, 4), (2, 4, 1, 2, 1), (2, 1, 2, 2, 1), (8, 2, 2, 8, 2)],
)
def test_default_threads(monkeypatch, cores, experts, replicas, gateway, others):
    monkeypatch.setattr(hardware, "available_cores", lambda: cores)
    spec = ClusterSpec(model=Path("m"), experts=experts, replicas=replicas)
    assert (spec.gateway_threads(), spec.service_threads()) == (gateway, others)


def test_threads_flag_sets_every_service(monkeypatch):
    monkeypatch.setattr(hardware, "available_cores", lambda: 8)
    spec = ClusterSpec(model=Path("m"), experts=2, threads=3)
    assert (spec.gateway_threads(), spec.service_threads()) == (3, 3)


def test_benches_run_openmp_as_up_runs_its_gateway():
    import bench
    from moemesh.launcher import GATEWAY_ENV

    assert GATEWAY_ENV.items() <= bench.OPENMP_ENV.items()
