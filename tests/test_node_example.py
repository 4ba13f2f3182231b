"""examples/node (@grpc/grpc-js, installed by `make install`) against the `moemesh up` cluster: its
GenerateStream and two-turn Chat print the same greedy tokens as the Python client."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from moemesh.client import Client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "node"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (the Node.js example needs it)")
def test_node_example_prints_the_python_clients_tokens(cluster):
    assert (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir(), "run `make install` (npm ci in examples/node)"
    result = subprocess.run(
        ["node", "client.js", "--address", cluster.address, "--prompt", "Hello", "--max-new-tokens", "6"],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=100,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    generated = re.search(r"^generate token_ids=(\S+) finish_reason=length$", result.stdout, re.MULTILINE)
    chats = re.findall(r"^chat session_id=(\w+) token_ids=(\S+)$", result.stdout, re.MULTILINE)
    assert generated and len(chats) == 2, result.stdout
    assert chats[0][0] == chats[1][0], "the second turn continues the first's session"
    with Client(cluster.address) as client:
        assert json.loads(generated.group(1)) == client.generate("Hello", max_new_tokens=6, temperature=0).token_ids
        first = client.chat("Hello", max_new_tokens=6, temperature=0)
        expected = [first.completion().token_ids]
        second = client.chat("And then?", session_id=first.session_id, max_new_tokens=6, temperature=0)
        expected.append(second.completion().token_ids)
    assert [json.loads(ids) for _, ids in chats] == expected
