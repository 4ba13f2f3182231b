"""Malformed calls to the internal Router and Expert services answer INVALID_ARGUMENT on their own, and the
stream they came on keeps serving the calls after them."""

import grpc
import pytest
import torch

from moemesh import codec
from moemesh.rpc import CHANNEL_OPTIONS
from moemesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc, tensor_pb2

pytestmark = pytest.mark.integration

HIDDEN = 64  # tiny checkpoints' hidden size


def one_call(stream_method, request):
    return next(iter(stream_method(iter([request]), timeout=30)))


def calls(stream_method, *requests) -> list:
    """Every request on one stream; the responses in order."""
    return list(stream_method(iter(requests), timeout=30))


def expert_stub(cluster, index: int):
    return expert_pb2_grpc.ExpertStub(grpc.insecure_channel(cluster.experts[index], options=CHANNEL_OPTIONS))


def expert_request(layer: int, experts: list[tuple[int, int]], hidden: tensor_pb2.Tensor) -> expert_pb2.ExpertRequest:
    groups = [expert_pb2.ExpertGroup(expert=e, num_tokens=n) for e, n in experts]
    return expert_pb2.ExpertRequest(request_id=7, layer=layer, groups=groups, hidden=hidden)


def rows(n: int) -> tensor_pb2.Tensor:
    return codec.to_pb(torch.randn(n, HIDDEN))


def test_expert_describe_reports_its_shard(cluster):
    held = {}
    for i in range(len(cluster.experts)):
        info = expert_stub(cluster, i).Describe(expert_pb2.DescribeExpertRequest(), timeout=10)
        held[i] = {(entry.layer, e) for entry in info.layers for e in entry.experts}
    expected = {0: (0, 1), 1: (2, 3)}
    assert held == {shard: {(layer, e) for layer in range(2) for e in experts} for shard, experts in expected.items()}


def test_expert_answers_a_valid_request(cluster):
    response = one_call(expert_stub(cluster, 0).Forward, expert_request(1, [(0, 2), (1, 3)], rows(5)))
    assert response.request_id == 7
    assert list(response.output.shape) == [5, HIDDEN]


BAD_EXPERT_REQUESTS = [
    ((0, [(0, 3)], tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, HIDDEN], data=b"\0" * 100)),
     "hidden: 100 bytes do not match dtype float32 and shape [3, 64]"),
    ((0, [(0, 3)], tensor_pb2.Tensor(shape=[3, HIDDEN])), "hidden: dtype must be one of"),
    ((9, [(0, 3)], rows(3)), "layer: 9 is not an MoE layer"),
    ((0, [(3, 3)], rows(3)), "groups: expert 3 of layer 0 is not on this shard"),
    ((0, [(0, 4)], rows(3)), "does not match the groups' 4 tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), BAD_EXPERT_REQUESTS, ids=[m for _, m in BAD_EXPERT_REQUESTS])
def test_malformed_expert_request(cluster, args, message):
    good = expert_request(0, [(1, 2)], rows(2))
    good.request_id = 8
    bad, ok = calls(expert_stub(cluster, 0).Forward, expert_request(*args), good)
    assert bad.request_id == 7 and bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert message in bad.status.message and not bad.HasField("output")
    assert ok.request_id == 8 and ok.status.code == 0 and list(ok.output.shape) == [2, HIDDEN]


BAD_ROUTER_REQUESTS = [
    ((5, rows(2)), "layer: 5 is not an MoE layer"),
    ((0, codec.to_pb(torch.randn(2, HIDDEN + 1))), f"hidden: shape [2, {HIDDEN + 1}], expected [tokens, {HIDDEN}]"),
    ((0, tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_BFLOAT16, shape=[2, HIDDEN], data=b"12")), "hidden: 2 bytes"),
]


@pytest.mark.parametrize(("args", "message"), BAD_ROUTER_REQUESTS, ids=[m for _, m in BAD_ROUTER_REQUESTS])
def test_malformed_router_request(cluster, args, message):
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(cluster.router, options=CHANNEL_OPTIONS))
    layer, hidden = args
    bad, ok = calls(
        stub.Forward,
        router_pb2.MoeRequest(request_id=1, layer=layer, hidden=hidden),
        router_pb2.MoeRequest(request_id=2, layer=1, hidden=rows(3)),
    )
    assert bad.request_id == 1 and bad.status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert message in bad.status.message
    assert ok.request_id == 2 and ok.status.code == 0 and list(ok.output.shape) == [3, HIDDEN]
