"""`moemesh up --tls`: TLS on the gateway's port, mutual TLS between gateway, router and experts, TLS to Redis.

Internal ports refuse plaintext clients, clients without a certificate and clients whose certificate another CA
signed; each refusal comes from the server (every client here trusts the cluster's CA), and a client with the
cluster's certificate is served.
"""

import asyncio
import subprocess
import sys

import grpc
import pytest
import redis
import torch

from moemesh import codec
from moemesh.certs import CertFiles
from moemesh.client import AsyncClient
from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.tls import Tls, open_channel
from moemesh.v1 import expert_pb2, expert_pb2_grpc, gateway_pb2, gateway_pb2_grpc, router_pb2, router_pb2_grpc
from tests.helpers import Cluster

pytestmark = pytest.mark.integration

HIDDEN = 64  # tiny checkpoints' hidden size
REQUEST = gateway_pb2.GenerateRequest(
    prompt_token_ids=[5, 6, 7, 8], sampling=gateway_pb2.SamplingParams(max_new_tokens=6)
)


@pytest.fixture(scope="module")
def tls_cluster(mixtral_dir) -> Cluster:
    """`moemesh up --tls`: certificates made in a temporary directory, the CA's path printed."""
    c = Cluster(mixtral_dir, "--experts", "2", "--dtype", "float32", "--tls")
    yield c
    c.close()


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory) -> CertFiles:
    """A certificate (and CA) made by another `moemesh certs` run."""
    directory = tmp_path_factory.mktemp("other-ca")
    subprocess.run([sys.executable, "-m", "moemesh.cli", "certs", str(directory)], check=True, timeout=60)
    return CertFiles.in_dir(directory)


def clients(cluster: Cluster, other: CertFiles) -> dict[str, grpc.ChannelCredentials | None]:
    """The clients an internal port must refuse; all but the plaintext one trust the cluster's CA."""
    return {
        "plaintext": None,
        "no client certificate": Tls.load(ca=cluster.ca).channel_credentials(),
        "another CA's certificate": Tls.load(other.cert, other.key, cluster.ca).channel_credentials(),
    }


def cluster_credentials(cluster: Cluster) -> grpc.ChannelCredentials:
    """What the services themselves present: `up --tls` made its files next to the CA."""
    files = CertFiles.in_dir(cluster.ca.parent)
    return Tls.load(files.cert, files.key, files.ca).channel_credentials()


def internal_call(cluster: Cluster, role: str, credentials: grpc.ChannelCredentials | None):
    """One valid Forward call to the router or to expert shard 0 (layer 1, its experts 0 and 1)."""
    hidden = codec.to_pb(torch.randn(3, HIDDEN))
    if role == "router":
        address, stub = cluster.router, router_pb2_grpc.RouterStub
        request = router_pb2.MoeRequest(request_id=1, layer=1, hidden=hidden)
    else:
        address, stub = cluster.experts[0], expert_pb2_grpc.ExpertStub
        groups = [expert_pb2.ExpertGroup(expert=0, num_tokens=1), expert_pb2.ExpertGroup(expert=1, num_tokens=2)]
        request = expert_pb2.ExpertRequest(request_id=1, layer=1, groups=groups, hidden=hidden)
    with open_channel(address, credentials, CHANNEL_OPTIONS) as channel:
        return next(iter(stub(channel).Forward(iter([request]), timeout=30)))


@pytest.mark.timeout(300)
def test_gateway_serves_over_tls_with_the_ca(tls_cluster):
    assert tls_cluster.ca is not None and tls_cluster.ca.name == "ca.pem"
    response = tls_cluster.stub.Generate(REQUEST, timeout=60)
    assert response.finish_reason == "length" and len(response.token_ids) == 6
    with grpc.insecure_channel(tls_cluster.address, options=CHANNEL_OPTIONS) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            gateway_pb2_grpc.GatewayStub(channel).Generate(REQUEST, timeout=10)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(240)
def test_generate_command_with_tls_ca(tls_cluster):
    argv = [sys.executable, "-m", "moemesh.cli", "generate", "--address", tls_cluster.address, "--tls-ca",
            str(tls_cluster.ca), "--max-new-tokens", "4", "Hello"]  # fmt: skip
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "[finish_reason=length prompt_tokens=" in result.stdout and "completion_tokens=4]" in result.stdout


@pytest.mark.timeout(120)
def test_chat_command_and_async_client_with_tls_ca(tls_cluster):
    argv = [sys.executable, "-m", "moemesh.cli", "chat", "--address", tls_cluster.address, "--tls-ca",
            str(tls_cluster.ca), "--max-new-tokens", "3"]  # fmt: skip
    result = subprocess.run(argv, input="Hello\n", capture_output=True, text=True, timeout=100)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1, result.stdout + result.stderr

    async def generate() -> list[int]:
        async with AsyncClient(tls_cluster.address, tls_ca=tls_cluster.ca) as client:
            return (await client.generate(list(REQUEST.prompt_token_ids), max_new_tokens=6)).token_ids

    assert asyncio.run(generate()) == list(tls_cluster.stub.Generate(REQUEST, timeout=60).token_ids)


@pytest.mark.timeout(240)
def test_sessions_and_registry_use_redis_over_tls(tls_cluster):
    assert tls_cluster.redis.startswith("rediss://")
    request = gateway_pb2.ChatRequest(
        messages=[gateway_pb2.Message(role="user", content="Hi")], sampling=gateway_pb2.SamplingParams(max_new_tokens=3)
    )
    session_id = list(tls_cluster.stub.Chat(request, timeout=60))[0].session_id
    session = tls_cluster.stub.GetSession(gateway_pb2.GetSessionRequest(session_id=session_id), timeout=10)
    assert [m.role for m in session.messages] == ["user", "assistant"]
    plaintext = tls_cluster.redis.replace("rediss://", "redis://")
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(plaintext, socket_timeout=5).ping()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("role", ["router", "expert"])
@pytest.mark.parametrize("client", ["plaintext", "no client certificate", "another CA's certificate"])
def test_internal_port_refuses_clients_without_a_certificate_of_its_ca(tls_cluster, other_ca, role, client):
    with pytest.raises(grpc.RpcError) as refused:
        internal_call(tls_cluster, role, clients(tls_cluster, other_ca)[client])
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.timeout(240)
@pytest.mark.parametrize("role", ["router", "expert"])
def test_internal_port_serves_a_client_with_the_cluster_certificate(tls_cluster, role):
    response = internal_call(tls_cluster, role, cluster_credentials(tls_cluster))
    assert response.status.code == 0 and list(response.output.shape) == [3, HIDDEN]
