"""The Router gRPC servicer: converts messages and delegates to `RoutedMoE`."""

from collections.abc import Iterator

import torch

from moemesh import codec, tracing
from moemesh.errors import InvalidArgument
from moemesh.moe import RoutedMoE
from moemesh.rpc import answer_calls, map_errors
from moemesh.v1 import call_pb2, router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(
        self,
        moe: RoutedMoE,
        hidden_size: int,
        device: torch.device,
        compute_dtype: torch.dtype,
        wire_dtype: torch.dtype,
    ):
        """`device`: where the gates are (the hidden states are gated there)."""
        self.moe, self.hidden_size, self.device = moe, hidden_size, device
        self.compute_dtype, self.wire_dtype = compute_dtype, wire_dtype

    @map_errors
    def Forward(self, requests: Iterator[router_pb2.MoeRequest], context) -> Iterator[router_pb2.MoeResponse]:
        yield from answer_calls(requests, self._forward, _failed)

    def _forward(self, request: router_pb2.MoeRequest) -> router_pb2.MoeResponse:
        if request.layer not in self.moe.gates:
            raise InvalidArgument(f"layer: {request.layer} is not an MoE layer (have {sorted(self.moe.gates)})")
        hidden = codec.from_pb(request.hidden, self.compute_dtype, self.device, field="hidden")
        if hidden.ndim != 2 or hidden.shape[1] != self.hidden_size:
            raise InvalidArgument(f"hidden: shape {list(hidden.shape)}, expected [tokens, {self.hidden_size}]")
        attributes = {"moemesh.layer": request.layer, "moemesh.tokens": hidden.shape[0]}
        with tracing.call_span("moe.layer", request.traceparent, attributes):
            out = self.moe(request.layer, hidden, request.timeout_ms / 1000 if request.timeout_ms else None)
        return router_pb2.MoeResponse(request_id=request.request_id, output=codec.to_pb(out, self.wire_dtype))


def _failed(request_id: int, status: call_pb2.CallStatus) -> router_pb2.MoeResponse:
    return router_pb2.MoeResponse(request_id=request_id, status=status)
