"""The Expert gRPC servicer: converts messages and delegates to `ExpertShard`."""

from collections.abc import Iterator

import torch

from moemesh import codec
from moemesh.moe import ExpertGroup
from moemesh.rpc import map_errors
from moemesh.v1 import expert_pb2, expert_pb2_grpc
from services.experts.shard import ExpertShard


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    def __init__(self, shard: ExpertShard, compute_dtype: torch.dtype, wire_dtype: torch.dtype):
        self.shard, self.compute_dtype, self.wire_dtype = shard, compute_dtype, wire_dtype
        self.served = 0  # requests answered, for operators and tests to see traffic arrive

    @map_errors
    def Forward(self, requests: Iterator[expert_pb2.ExpertRequest], context) -> Iterator[expert_pb2.ExpertResponse]:
        for request in requests:
            rows = codec.from_pb(request.hidden, self.compute_dtype, field="hidden")
            groups = [ExpertGroup(g.expert, g.num_tokens) for g in request.groups]
            out = self.shard.forward(request.layer, groups, rows)
            self.served += 1
            yield expert_pb2.ExpertResponse(request_id=request.request_id, output=codec.to_pb(out, self.wire_dtype))

    @map_errors
    def Describe(self, request, context) -> expert_pb2.DescribeExpertResponse:
        return expert_pb2.DescribeExpertResponse(
            model_fingerprint=self.shard.fingerprint,
            parameter_bytes=self.shard.parameter_bytes,
            requests_served=self.served,
            layers=[expert_pb2.LayerExperts(layer=layer, experts=held) for layer, held in self.shard.layers.items()],
        )
