"""The Expert gRPC servicer: converts messages and delegates to `ExpertShard`."""

import time
from collections.abc import Iterator

import torch

from moemesh import codec, tracing
from moemesh.moe import ExpertGroup
from moemesh.rpc import answer_calls, map_errors
from moemesh.v1 import call_pb2, expert_pb2, expert_pb2_grpc
from services.experts.shard import ExpertShard


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    def __init__(self, shard: ExpertShard, compute_dtype: torch.dtype, wire_dtype: torch.dtype, slowdown: float = 1.0):
        self.shard, self.compute_dtype, self.wire_dtype = shard, compute_dtype, wire_dtype
        self.served = 0  # requests answered, for operators and tests to see traffic arrive
        self.slowdown = slowdown  # fault injection: each call takes this many times its compute time, when on
        self.slow = False

    def toggle_slowdown(self) -> None:
        self.slow = not self.slow

    @map_errors
    def Forward(self, requests: Iterator[expert_pb2.ExpertRequest], context) -> Iterator[expert_pb2.ExpertResponse]:
        yield from answer_calls(requests, self._forward, _failed)

    def _forward(self, request: expert_pb2.ExpertRequest) -> expert_pb2.ExpertResponse:
        started = time.monotonic()
        rows = codec.from_pb(request.hidden, self.compute_dtype, field="hidden")
        groups = [ExpertGroup(g.expert, g.num_tokens) for g in request.groups]
        attributes = {"moemesh.layer": request.layer, "moemesh.tokens": rows.shape[0], "moemesh.experts": len(groups)}
        with tracing.call_span("expert.forward", request.trace_links, attributes):
            out = self.shard.forward(request.layer, groups, rows)
        if self.slow:
            time.sleep((self.slowdown - 1) * (time.monotonic() - started))
        self.served += 1
        return expert_pb2.ExpertResponse(request_id=request.request_id, output=codec.to_pb(out, self.wire_dtype))

    @map_errors
    def Describe(self, request, context) -> expert_pb2.DescribeExpertResponse:
        return expert_pb2.DescribeExpertResponse(
            model_fingerprint=self.shard.fingerprint,
            parameter_bytes=self.shard.parameter_bytes,
            requests_served=self.served,
            layers=[expert_pb2.LayerExperts(layer=layer, experts=held) for layer, held in self.shard.layers.items()],
        )


def _failed(request_id: int, status: call_pb2.CallStatus) -> expert_pb2.ExpertResponse:
    return expert_pb2.ExpertResponse(request_id=request_id, status=status)
