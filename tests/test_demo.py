"""`make demo` as a script or CI runs it, without a terminal: one exchange, then every process it started is
stopped and it exits 0; a second run right after works the same."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import session_alive

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_demo(port: int, state_dir: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable, "MOEMESH_DEMO_PORT": str(port), "XDG_STATE_HOME": str(state_dir)}
    proc = subprocess.Popen(
        ["bash", "scripts/demo.sh"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
    assert not session_alive(proc.pid), f"a process make demo started outlived it:\n{out}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def test_demo_twice_without_a_terminal_answers_and_leaves_nothing_running(tmp_path):
    port = free_port()
    for run in range(2):
        result = run_demo(port, tmp_path)
        assert result.returncode == 0, result.stdout
        out = result.stdout
        assert f"gateway listening on 127.0.0.1:{port}" in out
        assert "refund" in out.split("== one exchange", 1)[1]  # the bot's reply
        assert "[gateway] gateway compute: device cpu, dtype " in out
        assert '"trace_id"' not in out and " INFO " not in out, out  # the request log and info lines: in files
        logs = sorted((tmp_path / "moemesh" / "logs").iterdir())
        assert len(logs) == run + 1
        assert '"method":"Chat","code":"OK"' in (logs[-1] / "gateway.log").read_text()
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
