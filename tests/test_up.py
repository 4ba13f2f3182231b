"""`moemesh up`: ready line, clean shutdown of every child, clear failure when a child cannot start."""

import json
import signal
import subprocess
import sys

import pytest

from tests.helpers import UpProcess

pytestmark = pytest.mark.integration


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_leaves_no_child(mixtral_window_dir, sig):
    up = UpProcess(mixtral_window_dir, "--experts", "2", "--replicas", "2")
    try:
        up.wait_for(r"^gateway listening on 127\.0\.0\.1:\d+$")
        children = children_of(up.proc.pid)
        assert len(children) == 1 + 4 + 1 + 1  # redis, 2 shards x 2 replicas, router, gateway
        up.proc.send_signal(sig)
        assert up.proc.wait(60) == 0
    finally:
        up.stop()
    assert not up.group_alive(), "a child of moemesh up outlived it"


def test_child_that_fails_to_start_fails_up_with_its_cause(mixtral_window_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in mixtral_window_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "config.json").read_text())
    config["model_type"] = "gpt-unknown"
    (broken / "config.json").write_text(json.dumps(config))
    result = subprocess.run(
        [sys.executable, "-m", "moemesh.cli", "up", "--model", str(broken), "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "unsupported model_type 'gpt-unknown'" in output
    assert "exited with code" in output and "before it was ready" in output
