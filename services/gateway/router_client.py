"""`RouterClient`: the gateway's `RoutedExperts` when the experts run as services behind a router."""

from collections.abc import Callable

import grpc
import torch

from moemesh import codec
from moemesh.errors import Unavailable
from moemesh.rpc import CHANNEL_OPTIONS, StreamClient, wait
from moemesh.v1 import router_pb2, router_pb2_grpc


class RouterClient:
    def __init__(self, address: str, compute_dtype: torch.dtype, wire_dtype: torch.dtype, timeout_s: float):
        self.compute_dtype, self.wire_dtype, self.timeout_s = compute_dtype, wire_dtype, timeout_s
        self.client = StreamClient(address, lambda channel: router_pb2_grpc.RouterStub(channel).Forward)

    @staticmethod
    def wait_ready(address: str, timeout_s: float) -> None:
        with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=timeout_s)
            except grpc.FutureTimeoutError:
                raise Unavailable(f"router {address}: not reachable within {timeout_s:g}s") from None

    def submit(self, layer: int, hidden: torch.Tensor) -> Callable[[], torch.Tensor]:
        future = self.client.submit(router_pb2.MoeRequest(layer=layer, hidden=codec.to_pb(hidden, self.wire_dtype)))

        def output() -> torch.Tensor:
            response = wait(future, self.timeout_s, self.client.target)
            return codec.from_pb(response.output, self.compute_dtype, field="output")

        return output
