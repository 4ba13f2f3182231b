"""Proto hygiene with buf (pinned in tools/package.json, installed by `make install`): the protos pass
`buf lint` (buf.yaml: STANDARD with documented exceptions) and `buf breaking` against the last release's
image, which does catch a breaking change; and `buf curl` calls a live gateway through server reflection."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from moemesh.client import Client

REPO = Path(__file__).resolve().parents[1]
BUF = REPO / "tools" / "node_modules" / ".bin" / "buf"
RELEASE = REPO / "protos" / "releases" / "v0.1.0.binpb"

pytestmark = pytest.mark.timeout(120)


def buf(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    assert BUF.exists(), f"{BUF} is missing: run `make install` (npm ci in tools/)"
    return subprocess.run([str(BUF), *args], cwd=cwd, capture_output=True, text=True, timeout=100)


def test_lint_passes():
    result = buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_since_the_last_release():
    result = buf("breaking", "--against", str(RELEASE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_breaking_catches_a_renumbered_field(tmp_path):
    """The check is real: the same protos with one field number changed fail it."""
    shutil.copy(REPO / "buf.yaml", tmp_path)
    shutil.copytree(REPO / "protos" / "moemesh", tmp_path / "protos" / "moemesh")
    gateway = tmp_path / "protos" / "moemesh" / "v1" / "gateway.proto"
    gateway.write_text(gateway.read_text().replace("string finish_reason = 4;", "string finish_reason = 9;"))
    result = buf("breaking", "--against", str(RELEASE), cwd=tmp_path)
    assert result.returncode != 0 and "finish_reason" in result.stdout, result.stdout + result.stderr


@pytest.mark.integration
def test_buf_curl_through_reflection(cluster):
    """The README's `buf curl` example: no proto files given, the gateway's reflection describes the API."""
    url = f"http://{cluster.address}/moemesh.v1.Gateway/GenerateStream"
    body = json.dumps({"prompt_token_ids": [5, 6, 7, 8], "sampling": {"max_new_tokens": 4}})
    result = buf("curl", "--protocol", "grpc", "--http2-prior-knowledge", "--data", body, url)
    assert result.returncode == 0, result.stderr
    decoder, text, tokens = json.JSONDecoder(), result.stdout.strip(), []
    while text:  # one JSON object per streamed message
        message, end = decoder.raw_decode(text)
        tokens += message.get("tokenIds", [])
        text = text[end:].strip()
    with Client(cluster.address) as client:
        assert tokens == client.generate([5, 6, 7, 8], max_new_tokens=4).token_ids
