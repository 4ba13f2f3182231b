"""The Expert gRPC servicer: converts messages and delegates to `ExpertShard`."""

import time
from collections.abc import Iterator

import torch
from prometheus_client import Counter, Gauge, Histogram

from moemesh import codec, tracing
from moemesh.errors import Unavailable
from moemesh.moe import ExpertGroup
from moemesh.rpc import answer_calls, map_errors
from moemesh.v1 import call_pb2, expert_pb2, expert_pb2_grpc
from services.experts.shard import ExpertShard

# Metrics (README: Observability); `layer` is a layer index this shard holds, never client text.
TOKENS = Counter("moemesh_expert_tokens", "Token rows computed, per MoE layer", ["layer"])
CALL_SECONDS = Histogram(
    "moemesh_expert_call_seconds", "Compute time of one call, per MoE layer", ["layer"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)  # fmt: skip
QUEUE_DEPTH = Gauge("moemesh_expert_queue_depth", "Calls received and not yet answered")
PARAMETER_BYTES = Gauge("moemesh_expert_parameter_bytes", "Bytes of expert weights resident in this replica")


class ExpertServicer(expert_pb2_grpc.ExpertServicer):
    def __init__(
        self,
        shard: ExpertShard | None,
        device: torch.device,
        compute_dtype: torch.dtype,
        wire_dtype: torch.dtype,
    ):
        """`shard`: None while it loads (calls are UNAVAILABLE until `set_shard`); its weights are on `device`."""
        self.shard, self.device, self.compute_dtype, self.wire_dtype = None, device, compute_dtype, wire_dtype
        self.served = 0  # requests answered, for operators and tests to see traffic arrive
        if shard is not None:
            self.set_shard(shard)

    def set_shard(self, shard: ExpertShard) -> None:
        self.shard = shard
        PARAMETER_BYTES.set(shard.parameter_bytes)

    @map_errors
    def Forward(self, requests: Iterator[expert_pb2.ExpertRequest], context) -> Iterator[expert_pb2.ExpertResponse]:
        yield from answer_calls(requests, self._forward, _failed)

    def _forward(self, request: expert_pb2.ExpertRequest) -> expert_pb2.ExpertResponse:
        QUEUE_DEPTH.inc()
        try:
            return self._compute(request)
        finally:
            QUEUE_DEPTH.dec()

    def _compute(self, request: expert_pb2.ExpertRequest) -> expert_pb2.ExpertResponse:
        started = time.monotonic()
        rows = codec.from_pb(request.hidden, self.compute_dtype, self.device, field="hidden")
        groups = [ExpertGroup(g.expert, g.num_tokens) for g in request.groups]
        attributes = {"moemesh.layer": request.layer, "moemesh.tokens": rows.shape[0], "moemesh.experts": len(groups)}
        with tracing.call_span("expert.forward", request.traceparent, attributes):
            out = self._loaded().forward(request.layer, groups, rows)
        self.served += 1
        layer = str(request.layer)  # a layer the shard holds: `forward` refused any other
        TOKENS.labels(layer=layer).inc(rows.shape[0])
        CALL_SECONDS.labels(layer=layer).observe(time.monotonic() - started)
        return expert_pb2.ExpertResponse(request_id=request.request_id, output=codec.to_pb(out, self.wire_dtype))

    @map_errors
    def Describe(self, request, context) -> expert_pb2.DescribeExpertResponse:
        shard = self._loaded()
        return expert_pb2.DescribeExpertResponse(
            model_fingerprint=shard.fingerprint,
            parameter_bytes=shard.parameter_bytes,
            requests_served=self.served,
            layers=[expert_pb2.LayerExperts(layer=layer, experts=held) for layer, held in shard.layers.items()],
        )

    def _loaded(self) -> ExpertShard:
        if self.shard is None:
            raise Unavailable("the expert shard is still loading; retry")
        return self.shard


def _failed(request_id: int, status: call_pb2.CallStatus) -> expert_pb2.ExpertResponse:
    return expert_pb2.ExpertResponse(request_id=request_id, status=status)
