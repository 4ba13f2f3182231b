"""How `moemesh up` connects its gateway to the experts: through its routers, or with `--routers 0` directly."""

from pathlib import Path

import pytest

from moemesh import cli, launcher
from tests.helpers import RecordingCluster

pytestmark = pytest.mark.timeout(30)
REDIS = "redis://127.0.0.1:1/0"


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("routers", [1, 2])
def test_the_gateway_calls_its_routers(tmp_path, routers):
    cluster = RecordingCluster()
    launcher._start(cluster, launcher.ClusterSpec(Path("/m"), routers=routers, redis_url=REDIS), tmp_path)
    gateway = cluster.argvs["gateway"]
    assert flag(gateway, "--router") == ",".join(["127.0.0.1:1"] * routers)
    assert flag(gateway, "--registry") is None


def test_without_routers_the_gateway_finds_the_experts_in_the_registry(tmp_path):
    cluster = RecordingCluster()
    launcher._start(cluster, launcher.ClusterSpec(Path("/m"), experts=2, routers=0, redis_url=REDIS), tmp_path)
    assert sorted(cluster.argvs) == ["expert-0.0", "expert-1.0", "gateway"]
    gateway = cluster.argvs["gateway"]
    assert flag(gateway, "--registry") == REDIS and flag(gateway, "--router") is None
    assert all(flag(argv, "--registry") == REDIS for name, argv in cluster.argvs.items() if name != "gateway")


def test_routers_may_be_zero_but_not_negative(capsys):
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["up", "--routers", "-1"])
    assert "must be at least 0, got -1" in capsys.readouterr().err
    assert cli._parser().parse_args(["up", "--routers", "0"]).routers == 0
